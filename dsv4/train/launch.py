"""`dsv4 train --nproc N`: start N processes on this machine under PyTorch's elastic agent (what `torchrun
--standalone --nproc-per-node N` runs) and report the first rank that fails.

Each process runs the same `python -m dsv4 train ...` command with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...), joins the process group (dsv4.train.distributed.init) and trains its share. When a
rank dies (an error, a kill, out of memory) the agent notices within a fraction of a second and stops the others:
the run ends with a message naming the rank instead of hanging in a collective. Snapshots are written under a
temporary name and renamed once complete, so the last one stays loadable.
Several machines: run torchrun yourself on each (README, "Training on several processes"); `dsv4 train` sees
torchrun's environment and does not launch again.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid


def describe(failure) -> str:
    """How a worker ended, in words (a torch.distributed.elastic ProcessFailure)."""
    if failure.exitcode is not None and failure.exitcode < 0:
        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    return f"exit code {failure.exitcode}"


def launch(nproc: int, argv: list[str], threads: int | None = None) -> int:
    """Run `python -m dsv4 <argv>` on `nproc` local processes; 0 when every rank finished, else 1 after printing
    which rank failed and how. threads: CPU threads per process (default: this machine's cores shared out)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # each rank's intra-op threads: the cores shared out
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dsv4-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "dsv4", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"dsv4 train: rank {rank} of {nproc} failed ({describe(failure)}); the other ranks were stopped. "
              f"The last snapshot in the run directory is complete: continue with --resume (on any number of "
              f"processes).", file=sys.stderr)
        return 1
    return 0
