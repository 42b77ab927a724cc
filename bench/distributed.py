"""`dsv4 train` on one process against `--nproc 2` and `--nproc 2 --expert-parallel 2`, side by side on this machine:
the step time and whether the losses agree.

    python bench/distributed.py --json bench/results/distributed_cpu.json
    python bench/distributed.py --preset tiny --dtype fp32 --steps 10

Each configuration runs the real command (and one process once more with one thread, another summation order, as
the yardstick for the loss differences) (`--steps N`, `--sft-steps 0`, no compile: a compiled sharded step would
compile per rank) on the same data, in turns (one, two, two+EP, one, ...) so the machine's drift falls on all. The
tokenizer and token files are prepared once and copied into every run. Step time = the median of the per-step times
from metrics.jsonl (its cumulative tokens/s), steps with an evaluation or a snapshot excluded. On a CPU the ranks
share the cores (each gets cores / nproc threads), so this measures what sharding costs on one machine, not a
speed-up: that takes one device per rank.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name -> (extra flags, extra environment); the second one-process run sums in another order (one thread), the
# yardstick for the ranks' loss differences: MoE routing turns summation-order noise into diverging losses after a
# few steps, whatever changed the order
LAYOUTS = {"one process": ([], {}), "one process, 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
           "2 ranks (FSDP2)": (["--nproc", "2"], {}),
           "2 ranks (FSDP2 + expert parallel 2)": (["--nproc", "2", "--expert-parallel", "2"], {})}


def step_times(metrics: Path, every: int) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    elapsed = [r["tokens"] / r["tok_per_s"] for r in rows]  # since the stage started, at the end of each step
    return [b - a for a, b, r in zip(elapsed, elapsed[1:], rows[1:]) if r["step"] % every]


def run(out: Path, base: list[str], extra: list[str], env: dict) -> tuple[list[float], dict[int, float]]:
    res = subprocess.run(base + ["--out", str(out)] + extra, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env})
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    metrics = out / "pretrain" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return step_times(metrics, int(base[base.index("--eval-every") + 1])), {r["step"]: r["loss"] for r in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="v4-2m-engram")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--json", default=None)
    opts = p.parse_args()
    every = opts.steps + 1  # no evaluation or snapshot but the last
    base = [sys.executable, "-m", "dsv4", "train", "--preset", opts.preset, "--dtype", opts.dtype, "--device", "cpu",
            "--steps", str(opts.steps), "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len),
            "--eval-every", str(every), "--save-every", str(every), "--sft-steps", "0", "--compile", "off",
            "--quiet"]
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    losses: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep"
        subprocess.run(base[:base.index("--steps")] + ["--steps", "1", "--out", str(prep)], cwd=ROOT, check=True,
                       capture_output=True)
        for turn in range(opts.turns):
            for name, (extra, env) in LAYOUTS.items():
                out = Path(tmp) / f"{turn}-{len(losses)}-{name.split()[0]}"
                out.mkdir()
                shutil.copy(prep / "tokenizer.json", out)
                shutil.copytree(prep / "data", out / "data")
                dts, losses[name] = run(out, base, extra, env)
                times[name].append(statistics.median(dts))
                shutil.rmtree(out)
    one = statistics.median(times["one process"])
    ref = losses["one process"]
    report = {"preset": opts.preset, "dtype": opts.dtype, "steps": opts.steps,
              "tokens_per_step": opts.batch_size * opts.seq_len,
              "layouts": {name: {"step_s": statistics.median(ts), "step_s_per_turn": ts,
                                 "time_vs_one_process": statistics.median(ts) / one,
                                 "loss_difference_per_step": [abs(losses[name][s] - ref[s]) for s in sorted(ref)]}
                          for name, ts in times.items()},
              "note": "CPU ranks share the machine's cores (cores / nproc threads each): the ratio is the cost of "
                      "sharding and of gloo's collectives on one machine, not a multi-device speed-up. Loss "
                      "differences: against the first one-process run, per step; the one-thread run shows what "
                      "another summation order alone does"}
    emit(report, opts.json)


if __name__ == "__main__":
    main()
