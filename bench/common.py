"""Helpers shared by the benchmarks: RSS readings, a memory watchdog for child processes, and the report every
benchmark prints (and writes with --json, e.g. under bench/results/) together with the machine it ran on."""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def watchdog(limit_kb: int):
    """Stop this process, reporting "oom", before it drives the machine into the kernel's OOM killer."""
    def watch():
        while True:
            if rss_kb() > limit_kb:
                print(json.dumps({"error": "oom", "rss_mb": rss_kb() / 1024}), flush=True)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def machine() -> dict:
    """What a figure depends on: CPU model, cores, the vector/matrix extensions that decide the fast dtype, memory,
    torch, and the commit measured."""
    import platform

    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit or None,
            "date": time.strftime("%Y-%m-%d")}


def emit(report: dict, path: str | None) -> None:
    """Print a benchmark's report as JSON with the machine and the command line, and write it to `path` if given."""
    report = {**report, "command": " ".join(["python", *sys.argv]), "machine": machine()}
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        from dsv4.atomic import atomic_text

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_text(path, text + "\n")


def add_run_args(p: argparse.ArgumentParser):
    """Options every side-by-side benchmark has: skipping the reference, the seed, the report's file, and the
    parent -> child plumbing."""
    p.add_argument("--json", metavar="PATH", help="also write the report here (bench/results/NAME.json)")
    p.add_argument("--ours-only", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child before it counts as 'timeout'")
    p.add_argument("--limit-kb", type=int, default=int(0.9 * available_kb()), help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("ours", "theirs"), dest="impl", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)


def save_shared_checkpoint(preset: str, seed: int, path: str, **overrides):
    """Write the weights both sides load: the preset (with `overrides`) without its MTP module (transformers builds
    none), freshly initialised with `seed`. Returns its ModelArgs."""
    import torch

    import dsv4

    full = dsv4.ModelArgs.from_name(preset, **overrides)
    args = dsv4.ModelArgs.from_dict({**full.to_dict(), "n_mtp_layers": 0,
                                     "compress_ratios": full.compress_ratios[: full.n_layers]})
    torch.manual_seed(seed)
    model = dsv4.Transformer(args)
    model.init_weights(seed=seed)
    dsv4.save_pretrained(model, path)
    return args


def run_script_child(script: str, args: list[str], timeout: float) -> dict:
    """Run `python script --child ... args` and return the last JSON line it printed: its result, or the error it
    reported ("oom" from the watchdog), or {"error": "timeout" | "oom" | "exit N", "stderr": ...}."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if proc.returncode == 0 or "error" in result:
            return result
    if proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr:
        return {"error": "oom"}
    return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-1500:]}
