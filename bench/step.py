"""The training step of the `make run` model, this checkout against an earlier commit, side by side in one run.

    python bench/step.py --base ec66be1 --json bench/results/step_v4_3m.json
    python bench/step.py --base ec66be1 --dtype fp32        # the dtype of a CPU without fast bf16

One step = `dsv4.train.trainer.Trainer.train_step` as `dsv4 train` runs it for `--preset` (default `v4-3m`, the
`make run` model when the committed results were taken; the base commit must know the preset) with `make run`'s settings
(16 x 256 tokens, MTP, the indexer's KL from the first step, the balance loss, Muon + AdamW, eager), on a fixed
batch of random tokens. The base commit is checked out in a temporary git worktree; the two sides run in their own
processes, in turns (base, head, base, head, ...), so that the machine's drift falls on both. tokens/s = batch x
seq / the median step of each turn; the ratio is the median over turns of head / base.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, tempfile, time, torch
from dsv4.config import ModelArgs
from dsv4.train.config import StageConfig
from dsv4.train.pipeline import build_model
from dsv4.train.trainer import Trainer
preset, batch, seq, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
args = ModelArgs.from_name(preset)
model = build_model(args, torch.device("cpu"), 0)
tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
cfg = StageConfig(steps=10**6, batch_size=batch, seq_len=seq, warmup=10, indexer_warmup=0, eval_every=10**6,
                  save_every=10**6)
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(model, cfg, out, lambda start: iter(lambda: (tokens[:, :-1], tokens[:, 1:]), None), [],
                      {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], progress=False)
    micro = trainer.batches(0)
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        trainer.train_step(micro)
        times.append(time.perf_counter() - start)
print(json.dumps({"step_s": times[3:]}))
"""


def turn(checkout: Path, a) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, a.preset, str(a.batch), str(a.seq), str(a.steps), a.dtype],
                         capture_output=True, text=True, env=env, cwd=checkout, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    steps = json.loads(out.stdout.strip().splitlines()[-1])["step_s"]
    return {"median_step_s": statistics.median(steps), "tok_per_s": a.batch * a.seq / statistics.median(steps)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    p.add_argument("--preset", default="v4-3m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per turn (after 3 untimed)")
    p.add_argument("--turns", type=int, default=3, help="turns per side")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", "--short", a.base], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), base_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            turns = []
            for i in range(a.turns):
                base, head = turn(worktree, a), turn(ROOT, a)
                turns.append({"base": base, "head": head, "ratio": head["tok_per_s"] / base["tok_per_s"]})
                print(f"turn {i + 1}/{a.turns}: base {base['tok_per_s']:.0f} tok/s, head {head['tok_per_s']:.0f} "
                      f"tok/s, {turns[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    median = lambda side: statistics.median(t[side]["tok_per_s"] for t in turns)  # noqa: E731
    emit({"benchmark": "training step, this checkout vs a base commit", "preset": a.preset,
          "shape": f"{a.batch}x{a.seq}", "dtype": a.dtype, "base": base_rev, "turns": turns,
          "base_tok_per_s": median("base"), "head_tok_per_s": median("head"),
          "speedup": statistics.median(t["ratio"] for t in turns)}, a.json)


if __name__ == "__main__":
    main()
