"""Which V4-shaped model learns the most in a fixed wall-clock budget on this CPU? Trains each candidate with
`dsv4 train --time-budget` (pretraining only, from a fresh tokenizer of the candidate's vocabulary) and scores it by
held-out bits-per-byte, beside the Kneser-Ney n-grams on the same bytes.

Every candidate keeps the whole architecture (mHC with 4 streams, SWA + CSA with the lightning indexer + HCA layers,
a hash-routed first layer then routed + shared experts, one MTP module); width, depth, experts, vocabulary and
sequence length vary. Each point runs in its own process, one after another (they would share the 2 cores).

    python bench/scaling.py --budget 5m --json bench/results/scaling.json --png bench/results/scaling.png
    python bench/scaling.py --list            # the candidates' sizes, nothing trained
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# name -> (ModelArgs overrides on `small`, training overrides). `small` itself is the largest point.
BASE = dict(window_size=128, original_seq_len=8192, n_hash_layers=1, hc_mult=4, n_activated_experts=2)


def trunk(dim: int, layers: int, vocab: int, heads: int, experts: int = 8) -> dict:
    """`layers` blocks (SWA first, then CSA and HCA alternating, the MTP block SWA), 64-wide heads, low-rank
    projections of dim / 2, experts of width dim, the indexer's top-32 of 4 heads."""
    ratios = [0] + [4 if i % 2 else 128 for i in range(1, layers)] + [0]
    return dict(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, head_dim=64, rope_head_dim=32,
                q_lora_rank=dim // 2, o_groups=2, o_lora_rank=dim // 2, compress_ratios=ratios, index_n_heads=4,
                index_head_dim=64, index_topk=32, n_routed_experts=experts, moe_inter_dim=dim)


CANDIDATES = {
    "d128-l4-v4k": (trunk(128, 4, 4096, heads=2), {}),  # became the preset v4-3m
    "d192-l4-v4k": (trunk(192, 4, 4096, heads=4), {}),
    "d256-l4-v8k": (trunk(256, 4, 8192, heads=4), {}),
    "d256-l4-v4k": (trunk(256, 4, 4096, heads=4), {}),
    "d256-l6-v4k": (trunk(256, 6, 4096, heads=4), {}),
    "d384-l6-v8k": (trunk(384, 6, 8192, heads=6, experts=16), {}),
    "small": ({}, {}),
    # variants of one model: "<model>-<what changes>"
    "d256-l4-v4k-seq256": (None, dict(seq_len=256, batch_size=16)),  # shorter windows, same tokens per step
    "d128-l4-v4k-seq256": (None, dict(seq_len=256, batch_size=16)),
    "d128-l4-v4k-hilr": (None, dict(lr=1e-2)),  # 3.3x the default peak lr (AdamW and Muon)
    "d128-l4-v4k-hilr256": (None, dict(lr=1e-2, seq_len=256, batch_size=16)),
}
# every point: the indexer trains sparse from the first step (a dense warm-up would compile a second set of graphs
# when it ends, minutes on 2 cores)
TRAIN = dict(indexer_warmup=0)


def model_args(name: str) -> dict:
    over, _ = CANDIDATES[name]
    if over is None:  # same model as the name it extends
        over = CANDIDATES[name.rsplit("-", 1)[0]][0]
    from dsv4.config import PRESETS

    return {**PRESETS["small"], **BASE, **over} if over else dict(PRESETS["small"])


def register(name: str) -> str:
    """Make the candidate a preset of this process so that the pipeline can build it."""
    from dsv4.config import PRESETS

    PRESETS[f"sweep-{name}"] = model_args(name)
    return f"sweep-{name}"


def sizes(name: str) -> dict:
    from dsv4.config import ModelArgs
    from dsv4.weights.info import model_info

    info = model_info(ModelArgs(**model_args(name)), contexts=(4096,))
    main = info["totals"]["main"]
    return {"total_params": main["total"], "active_params": main["active"],
            "active_nonembedding": main["active"] - info["params"]["main"].get("head", {}).get("active", 0),
            "flops_per_token": info["flops_per_token"]["4096"]["total_with_mtp"], **info["config"]}


def train_point(name: str, budget: float, out: Path, dtype: str, compile_: str) -> dict:
    """In this process: the pipeline's pretraining of candidate `name` within `budget` seconds, then its bpb."""
    import dataclasses

    import torch

    from dsv4.device import default_device, resolve_dtype
    from dsv4.eval.run import heldout_bpb
    from dsv4.tokenizers.text import Tokenizer
    from dsv4.train import pipeline
    from dsv4.train.config import TrainConfig
    from dsv4.weights.checkpoint import from_pretrained

    preset = register(name)
    d = TrainConfig()
    train = {**TRAIN, **CANDIDATES[name][1]}
    compile_ = train.pop("compile", compile_)
    cfg = TrainConfig(out=str(out), preset=preset, dtype=dtype, compile=compile_, time_budget=budget,
                      pretrain=dataclasses.replace(d.pretrain, steps=0, **train),
                      sft=dataclasses.replace(d.sft, steps=0))
    start = time.perf_counter()
    final = pipeline.run(cfg, progress=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    device = default_device()
    model = from_pretrained(final, device=device, dtype=resolve_dtype(dtype, device))
    tok = Tokenizer.from_file(final / "tokenizer.json")
    with torch.no_grad():
        bpb = heldout_bpb(model, tok, None, d.val_frac, cfg.pretrain.seq_len, None, out / "data")
    decided = json.loads((out / "pretrain" / "budget.json").read_text())
    return {"name": name, "train_wall_s": round(wall, 1), "steps": rows[-1]["step"], "tokens": rows[-1]["tokens"],
            "tok_per_s": round(rows[-1]["tok_per_s"], 1), "final_train_ce": rows[-1]["ce"],
            "val_loss": rows[-1].get("val_loss"), "budget_decision": decided,
            "seq_len": cfg.pretrain.seq_len, "batch_tokens": cfg.pretrain.tokens_per_step, "compile": compile_,
            "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."), **sizes(name), **bpb}


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "active_params", "active parameters (without MTP)"),
                           (axes[1], "tokens", "tokens seen in the budget")):
        for p in points:
            ax.scatter(p[key], p["bpb"], s=30)
            ax.annotate(p["name"], (p[key], p["bpb"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for base, style in (("bigram_bpb", "--"), ("kn3_bpb", ":"), ("kn4_bpb", "-.")):
            vals = [p[base] for p in points if p.get(base)]
            if vals:  # the baselines depend on the vocabulary: show their best over the candidates
                ax.axhline(min(vals), ls=style, c="grey", lw=1, label=f"best {base.removesuffix('_bpb')} (KN)")
        ax.set(xscale="log", xlabel=label, ylabel="held-out bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"equal wall-clock: {points[0]['budget_s'] / 60:.0f} min per model", fontsize=10)
    from dsv4.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="5m", help="wall-clock per candidate, tokenizer and data included")
    p.add_argument("--points", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--work", default="runs/scaling", help="where the candidates' runs go")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--png", metavar="PATH")
    p.add_argument("--list", action="store_true", help="print the candidates' sizes and stop")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: train this one point in this process
    args = p.parse_args()
    from dsv4.train.budget import parse_duration

    budget = parse_duration(args.budget)
    if args.list:
        for name in args.points:
            s = sizes(name)
            print(f"{name:>20}: {s['total_params'] / 1e6:6.1f}M total {s['active_params'] / 1e6:6.2f}M active, "
                  f"{s['flops_per_token'] / 1e6:7.1f} MFLOP/token")
        return
    work = Path(args.work)
    if args.point:
        r = train_point(args.point, budget, work / args.point, args.dtype, args.compile)
        r["budget_s"] = budget
        (work / f"{args.point}.json").write_text(json.dumps(r, indent=1))
        return
    points = []
    for name in args.points:
        if not (work / f"{name}.json").exists():  # a finished point is kept (delete it to train it again)
            # an empty torch.compile cache per point: each pays its compilation as a fresh clone's `make run` does
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str((work / name / "inductor-cache").resolve())}
            subprocess.run([sys.executable, __file__, "--point", name, "--budget", args.budget, "--dtype", args.dtype,
                            "--compile", args.compile, "--work", str(work)], check=True, env=env)
        points.append(json.loads((work / f"{name}.json").read_text()))
        p_ = points[-1]
        print(f"{name}: bpb {p_['bpb']:.4f} (bigram {p_['bigram_bpb']:.4f}, 3-gram {p_['kn3_bpb']:.4f}) "
              f"{p_['tokens'] / 1e6:.2f}M tokens in {p_['train_wall_s']:.0f} s", flush=True)
    best = min(points, key=lambda r: r["bpb"])
    report = {"benchmark": "held-out bpb of V4-shaped models trained for the same wall-clock",
              "budget_s": budget, "best": best["name"], "points": points}
    if args.png:
        plot(points, args.png)
        report["png"] = args.png
    emit(report, args.json)


if __name__ == "__main__":
    main()
