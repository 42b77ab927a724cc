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
}


def train_point(name: str, budget: float, work: Path, dtype: str) -> None:
    """In this process: tokenizer and token files (off the clock), then the pipeline within `budget` seconds."""
    import dataclasses

    from dsv4.config import PRESETS
    from dsv4.train import pipeline
    from dsv4.train.config import TrainConfig

    model, train = VARIANTS[name]
    PRESETS[f"budget-{name}"] = {**PRESETS["small"], **BASE, **model}
    out, data = work / name, work / f"tokens-v{model['vocab_size']}"
    if not (data / "tokenizer.json").exists():
        pipeline.prepare_data(TrainConfig(out=str(data)), data, model["vocab_size"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(data / "tokenizer.json", out)
    shutil.copytree(data / "data", out / "data")
    d = TrainConfig()
    cfg = TrainConfig(out=str(out), preset=f"budget-{name}", dtype=dtype, time_budget=budget,
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
            "steps": last["step"], "tokens": last["tokens"],
            "tok_per_s": round(last["tok_per_s"]), **json.loads((out / "wall.json").read_text()),
            **{k: ev[k] for k in ("bpb", "bigram_bpb", "kn3_bpb", "kn4_bpb", "val_tokens", "val_bytes", "window",
                                  "stride")},
            "vs_bigram": ev["bpb"] / ev["bigram_bpb"], "vs_kn4": ev["bpb"] / ev["kn4_bpb"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="10m", help="wall-clock of each run (as dsv4 train --time-budget)")
    p.add_argument("--points", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--work", default="runs/budget", help="where the runs go")
    p.add_argument("--json", metavar="PATH")
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
    emit({"benchmark": "whole make-run pipelines of variants of the make run model for one budget, scored by dsv4 eval",
          "budget": args.budget, "best": min(points, key=lambda r: r["bpb"])["name"], "points": points}, args.json)


if __name__ == "__main__":
    main()
