"""What `make run` buys with other choices: its model and variants (vocabulary, depth, width, batch, peak lr), each
trained as `make run` trains (the whole pipeline: pretraining sized to a wall-clock budget, then fine-tuning), then
scored as `make run` scores (`dsv4 eval`: the whole held-out split, 256-token windows every 128 tokens, beside
Kneser-Ney n-grams on the same tokens).

    python bench/budget_runs.py --budget 10m --json bench/results/budget_runs_10m.json
    python bench/budget_runs.py --points d128-l3-v2k d96-l3-v2k       # some of them

Unlike bench/scaling.py (pretraining alone, a sweep over sizes), this compares whole runs of the `make run` kind. The
tokenizer and token files of each vocabulary are made once before the clock starts (a fresh clone's `make run`
spends ~15 s of its 10 minutes on them); each point runs in its own process, one after another. A finished point is
kept: delete runs/budget/NAME to train it again.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402
from scaling import BASE, trunk  # noqa: E402

# name -> (model: the `small` preset with these overrides, pretraining overrides); "d<dim>-l<blocks>-v<vocabulary>"
VARIANTS = {
    "d128-l4-v4k": (trunk(128, 4, 4096, heads=2), {}),  # the preset v4-3m
    "d128-l4-v2k": (trunk(128, 4, 2048, heads=2), {}),
    "d128-l4-v1k": (trunk(128, 4, 1024, heads=2), {}),
    "d128-l3-v2k": (trunk(128, 3, 2048, heads=2), {}),  # became the preset v4-2m
    "d96-l3-v2k": (trunk(96, 3, 2048, heads=2), {}),
    "d128-l3-v2k-b32": (trunk(128, 3, 2048, heads=2), dict(batch_size=32)),  # 8192 tokens a step
    "d128-l3-v2k-lr7e-3": (trunk(128, 3, 2048, heads=2), dict(lr=7e-3)),
    "d128-l3-v2k-nomtp": (trunk(128, 3, 2048, heads=2), dict(mtp_weight=0.0)),  # what MTP's quarter of a step buys
    "d128-l3-v2k-adam1.5e-2": (trunk(128, 3, 2048, heads=2), dict(lr=1.5e-2, muon_lr=5e-3)),  # AdamW's groups 3x
    # issue 21's iso-compute pair, run back to back: the preset as `make run` trains it, and the same model with
    # Engram at layer 1 (tables 10x the backbone's 2.19M parameters: 170,888 rows per head, 2 orders x 4 heads of
    # 16) and its routed and shared experts narrowed from 128 to 104 so that the active parameters stay equal
    # (1.04M: backbone + gating + the rows a token reads; bench/engram.py's with_engram)
    "v4-2m": (trunk(128, 3, 2048, heads=2), {}),
    "v4-2m-engram": ({**trunk(128, 3, 2048, heads=2), "moe_inter_dim": 104}, dict(engram={"vocab": 170888})),
    # a candidate for `make run` (not iso-compute): the experts at full width, Engram's rows twice as wide (32: 128 per
    # order) and half as many (85,444 per head), the same table size
    "v4-2m-engram-wide": (trunk(128, 3, 2048, heads=2), dict(engram={"vocab": 85444, "dim": 128})),
    # half the batch (2048 tokens a step, twice the updates): the sweep's b32 lost to b16 at this budget
    "v4-2m-engram-b8": ({**trunk(128, 3, 2048, heads=2), "moe_inter_dim": 104},
                        dict(engram={"vocab": 170888}, batch_size=8)),
    # the tables at 5x the peak lr (the paper trains its Engram embeddings with Adam at 5x the lr)
    "v4-2m-engram-mem5x": ({**trunk(128, 3, 2048, heads=2), "moe_inter_dim": 104},
                           dict(engram={"vocab": 170888}, memory_lr=2.5e-2)),
}


def train_point(name: str, budget: float, work: Path, dtype: str) -> None:
    """In this process: tokenizer and token files (off the clock), then the pipeline within `budget` seconds."""
    import dataclasses

    from dsv4.config import PRESETS
    from dsv4.device import tune_cpu_allocator
    from dsv4.train import pipeline
    from dsv4.train.config import TrainConfig

    tune_cpu_allocator()  # as `dsv4 train` does (the points up to engram_memlr_10m.json ran without it)
    model, train = VARIANTS[name]
    PRESETS[f"budget-{name}"] = {**PRESETS["small"], **BASE, **model}
    out, data = work / name, work / f"tokens-v{model['vocab_size']}"
    if not (data / "tokenizer.json").exists():
        pipeline.prepare_data(TrainConfig(out=str(data)), data, model["vocab_size"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(data / "tokenizer.json", out)
    shutil.copytree(data / "data", out / "data")
    d, train = TrainConfig(), dict(train)
    engram = train.pop("engram", None)
    cfg = TrainConfig(out=str(out), preset=f"budget-{name}", dtype=dtype, time_budget=budget, engram=engram,
                      pretrain=dataclasses.replace(d.pretrain, **train))
    start = time.perf_counter()
    pipeline.run(cfg, progress=True)
    (out / "wall.json").write_text(json.dumps({"train_wall_s": round(time.perf_counter() - start, 1)}))


def summary(name: str, work: Path) -> dict:
    out = work / name
    ev = json.loads((out / "eval.json").read_text())["bpb"]
    last = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()][-1]
    cfg = json.loads((out / "train_config.json").read_text())
    model, _ = VARIANTS[name]
    return {"name": name, **{k: model[k] for k in ("dim", "n_layers", "vocab_size")},
            **{k: cfg["pretrain"][k] for k in ("lr", "batch_size", "seq_len", "eval_every", "save_every")},
            "moe_inter_dim": model.get("moe_inter_dim", 128), "engram": cfg.get("engram"),
            "steps": last["step"], "tokens": last["tokens"],
            "tok_per_s": round(last["tok_per_s"]), **json.loads((out / "wall.json").read_text()),
            **{k: ev[k] for k in ("bpb", "bigram_bpb", "kn3_bpb", "kn4_bpb", "val_tokens", "val_bytes", "window",
                                  "stride")},
            "vs_bigram": ev["bpb"] / ev["bigram_bpb"], "vs_kn4": ev["bpb"] / ev["kn4_bpb"]}


def plot(points: list[dict], work: Path, path: str) -> None:
    """Validation loss of each point against the tokens it saw and against wall-clock seconds, and the final bpb."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv4.train.plots import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in points:
        rows = [x for x in read_metrics(work / r["name"] / "pretrain" / "metrics.jsonl") if "val_loss" in x]
        label = f"{r['name']}: {r['bpb']:.3f} bpb = {r['vs_bigram']:.3f}x bigram"
        axes[0].plot([x["tokens"] / 1e6 for x in rows], [x["val_loss"] for x in rows], marker=".", label=label)
        axes[1].plot([x["tokens"] / x["tok_per_s"] for x in rows], [x["val_loss"] for x in rows], marker=".",
                     label=label)
    for ax, xlabel in zip(axes, ("tokens seen (M)", "pretraining seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 5.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("whole make-run pipelines, same wall-clock budget each (held-out bpb from dsv4 eval)")
    fig.tight_layout()
    from dsv4.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="10m", help="wall-clock of each run (as dsv4 train --time-budget)")
    p.add_argument("--points", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--work", default="runs/budget", help="where the runs go")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--png", metavar="PATH", help="validation loss against tokens and seconds, one line per point")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: train this one point in this process
    args = p.parse_args()
    from dsv4.train.budget import parse_duration

    work = Path(args.work)
    if args.point:
        return train_point(args.point, parse_duration(args.budget), work, args.dtype)
    points = []
    for name in args.points:
        out = work / name
        if not (out / "final").exists():
            subprocess.run([sys.executable, __file__, "--point", name, "--budget", args.budget, "--dtype", args.dtype,
                            "--work", str(work)], check=True)
        if not (out / "eval.json").exists():
            subprocess.run([sys.executable, "-m", "dsv4", "eval", "--ckpt", str(out / "final"), "--dtype", args.dtype,
                            "--no-samples", "--json", str(out / "eval.json")], check=True)
        points.append(summary(name, work))
        r = points[-1]
        print(f"{name}: bpb {r['bpb']:.4f} = {r['vs_bigram']:.3f}x the bigram, {r['vs_kn4']:.3f}x the 4-gram "
              f"({r['tokens'] / 1e6:.2f}M tokens, {r['tok_per_s']} tokens/s)", flush=True)
    if args.png:
        plot(points, work, args.png)
    emit({"benchmark": "whole make-run pipelines of variants of the make run model for one budget, scored by dsv4 eval",
          "budget": args.budget, "best": min(points, key=lambda r: r["bpb"])["name"], "points": points}, args.json)


if __name__ == "__main__":
    main()
