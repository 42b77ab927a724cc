"""How long the two set-up commands take from a fresh clone: `git clone` of this checkout's HEAD into a temporary
directory, then `make venv` (the pinned install) and `make TARGET` (`test` or `run`) with torch.compile's on-disk
cache empty, each timed from outside. For `make test` the report also carries pytest's summary and its slowest
tests.

    python bench/fresh.py --target test --json bench/results/make_test.json
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=("test", "run"), default="test")
    p.add_argument("--json", metavar="PATH", help="also write the report here (bench/results/NAME.json)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="dsv4-fresh-") as tmp:
        clone, cache = os.path.join(tmp, "dsv4"), os.path.join(tmp, "inductor-cache")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        if args.target == "test":
            env["PYTEST_ADDOPTS"] = "--durations=10 -p no:cacheprovider"
        install, rc, out = timed(["make", "venv"], clone, env)
        if rc:
            sys.exit(f"make venv failed:\n{out[-3000:]}")
        target, rc, out = timed(["make", args.target], clone, env)
        report = {"benchmark": f"make {args.target} from a fresh clone, torch.compile cache empty",
                  "install_s": round(install, 1), f"make_{args.target}_s": round(target, 1),
                  "total_s": round(install + target, 1), "total_min": round((install + target) / 60, 2),
                  "exit_code": rc}
        if args.target == "test":
            report["pytest"] = pytest_summary(out)
        else:
            report["output_tail"] = out[-4000:]
    emit(report, args.json)
    sys.exit(rc)


if __name__ == "__main__":
    main()
