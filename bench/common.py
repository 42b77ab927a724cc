"""Helpers shared by the benchmarks: RSS readings and a memory watchdog for child processes."""

import json
import os
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
