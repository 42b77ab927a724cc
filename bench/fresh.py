"""How long the two set-up commands take from a fresh clone: `git clone` of this checkout's HEAD into a temporary
directory, then `make venv` (the pinned install) and `make TARGET` (`test`, `run` or `run-multimodal`) with
torch.compile's on-disk cache empty, each timed from outside. For `make test` the report also carries pytest's
summary and its slowest tests; for `make run-multimodal`, the run's report and budget, and the run is kept (--keep)
for bench/multimodal.py.

    python bench/fresh.py --target test --json bench/results/make_test.json
    python bench/fresh.py --target run --json bench/results/make_run.json --png bench/results/make_run_loss.png
    python bench/fresh.py --target run --make-var DTYPE=fp32 --env ATEN_CPU_CAPABILITY=avx2 \
        --env ONEDNN_MAX_CPU_ISA=AVX2 --env MKL_ENABLE_INSTRUCTIONS=AVX2 --json bench/results/make_run_avx2.json
        (the last: a CPU without AVX-512, emulated on one that has it)
    python bench/fresh.py --target run-multimodal --keep runs/multimodal-fresh --json bench/results/make_run_mm.json
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str], cwd: str, env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, proc.stdout + proc.stderr


def pytest_summary(output: str) -> dict:
    """pytest's final counts ("420 passed, 18 warnings in 632.07s") and the slowest tests of --durations."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    last = lines[-1] if lines else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last)}
    slowest = [{"seconds": float(s), "test": name}
               for s, name in re.findall(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)", output, re.M)]
    return {"counts": counts, "slowest": slowest}


def run_results(clone: str, png: str | None) -> dict:
    """What `make run` left in the clone's runs/NAME: its eval report, pretraining's last metrics row and budget
    decision, the fine-tuning's validation loss before and after; the pretraining loss curve copied to `png`."""
    import glob
    import json
    import shutil

    found = sorted(glob.glob(os.path.join(clone, "runs", "*", "eval.json")))
    if not found:
        return {}
    run = os.path.dirname(found[0])
    ev = json.load(open(found[0]))
    rows = {s: [json.loads(x) for x in open(os.path.join(run, s, "metrics.jsonl"))]
            for s in ("pretrain", "sft") if os.path.exists(os.path.join(run, s, "metrics.jsonl"))}
    res = {"run": os.path.relpath(run, clone), "eval": {k: v for k, v in ev.items() if k != "ckpt"},
           "pretrain_last": rows.get("pretrain", [{}])[-1]}
    budget = os.path.join(run, "pretrain", "budget.json")
    if os.path.exists(budget):
        res["budget_decision"] = json.load(open(budget))
    if rows.get("sft"):
        res["sft_val_loss"] = {"before": rows["sft"][0].get("val_loss_start"), "after": rows["sft"][-1].get("val_loss")}
    if png:
        shutil.copy(os.path.join(run, "final", "pretrain_loss.png"), png)
        res["png"] = png
    return res


def multimodal_results(clone: str, keep: str | None) -> dict:
    """What `make run-multimodal` left in the clone: the final report (validation CE per task, expert load per
    modality's distances), the pixel tokenizer's report, the budget decision and the last metrics row; the whole run
    directory copied to `keep`."""
    import json
    import shutil

    run = os.path.join(clone, "runs", "multimodal")
    if not os.path.exists(os.path.join(run, "final", "report.json")):
        return {}
    report = json.load(open(os.path.join(run, "final", "report.json")))
    pixels = json.load(open(os.path.join(run, "pixels", "report.json")))
    rows = [json.loads(x) for x in open(os.path.join(run, "pretrain", "metrics.jsonl"))]
    res = {"val_ce_by_task": report["val_ce_by_task"],
           "expert_load_tv_from_text": report["expert_load_by_modality"]["tv_from_text"],
           "pixels": {"steps": pixels["steps"], "seconds": pixels["seconds"],
                      "reconstruction": pixels["reconstruction"]},
           "budget_decision": json.load(open(os.path.join(run, "pretrain", "budget.json"))),
           "pretrain_last": rows[-1], "samples": sorted(os.listdir(os.path.join(run, "samples")))}
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(run, keep)
        res["kept_in"] = keep
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=("test", "run", "run-multimodal"), default="test")
    p.add_argument("--keep", metavar="DIR", help="--target run-multimodal: copy the run here")
    p.add_argument("--json", metavar="PATH", help="also write the report here (bench/results/NAME.json)")
    p.add_argument("--make-var", action="append", default=[], metavar="NAME=VALUE",
                   help="passed to make, e.g. DTYPE=fp32 (the run of a CPU without fast bf16)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set for the install and the target, e.g. ATEN_CPU_CAPABILITY=avx2 (with "
                        "ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2: a CPU without AVX-512)")
    p.add_argument("--png", metavar="PATH", help="--target run: copy the run's pretraining loss curve here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="dsv4-fresh-") as tmp:
        clone, cache = os.path.join(tmp, "dsv4"), os.path.join(tmp, "inductor-cache")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, **dict(e.split("=", 1) for e in args.env)}
        if args.target == "test":
            env["PYTEST_ADDOPTS"] = "--durations=10 -p no:cacheprovider"
        install, rc, out = timed(["make", "venv"], clone, env)
        if rc:
            sys.exit(f"make venv failed:\n{out[-3000:]}")
        target, rc, out = timed(["make", args.target, *args.make_var], clone, env)
        report = {"benchmark": f"make {args.target} from a fresh clone, torch.compile cache empty",
                  "make_vars": args.make_var, "env": args.env,
                  "install_s": round(install, 1), f"make_{args.target}_s": round(target, 1),
                  "total_s": round(install + target, 1), "total_min": round((install + target) / 60, 2),
                  "exit_code": rc}
        if args.target == "test":
            report["pytest"] = pytest_summary(out)
        elif args.target == "run-multimodal":
            report["output_tail"] = "\n".join(line.rsplit("\r", 1)[-1] for line in out.split("\n"))[-4000:]
            report.update(multimodal_results(clone, args.keep))
        else:
            # progress bars redraw with \r: keep what each line ended as, so the tail shows the run's messages
            report["output_tail"] = "\n".join(line.rsplit("\r", 1)[-1] for line in out.split("\n"))[-4000:]
            report.update(run_results(clone, args.png))
    emit(report, args.json)
    sys.exit(rc)


if __name__ == "__main__":
    main()
