"""`dsv4 train --dtype auto`: the compute dtype whose whole training step is faster on this machine, measured.

`dsv4.device.fastest_dtype` decides from one [512, 512] matmul, which tells a CPU that runs bf16 natively (AMX,
AVX512-BF16) from one that emulates it. For a small model's training step that is not the whole story: the step is
mostly element-wise work, and mixed precision adds casts and an fp32 master copy. (On a 2-core Xeon with AMX the
`make run` model's bf16 step took 0.66 s against 0.55 s in fp32 until the experts' rows were rounded for oneDNN,
`dsv4.device.grouped_rows_multiple`; now 0.46 s.) So where the matmul says bf16 is native, a run of at least
MIN_STEPS steps (or one sized by a time budget) first times a few real steps of a throwaway copy of the model in
each dtype (alternating, after one warm-up step each: ~5 s for `make run`'s model) and keeps the faster. Where bf16
is emulated (fp32 wins by far), on accelerators (bf16 where supported) and for short runs, nothing is measured.

The choice is written to OUT/dtype.json, so that `--resume` continues in the dtype the run started with.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsv4.atomic import atomic_text
from dsv4.device import DTYPES, cpu_bf16_is_fast, resolve_dtype
from dsv4.model.transformer import Transformer
from dsv4.train.config import StageConfig

CANDIDATES = ("bf16", "fp32")
MIN_STEPS = 50  # a shorter run is not worth the ~8 probe steps


def time_steps(build: Callable[[], Transformer], stage: StageConfig, dtypes: tuple[str, ...] = CANDIDATES,
               rounds: int = 3) -> dict[str, float]:
    """Median seconds of one training step of `build()`'s model in each dtype, as `Trainer.train_step` runs it
    (`stage`'s batch shape and recipe, random tokens, no evaluation or snapshot): one untimed step each, then
    `rounds` timed steps each, the dtypes alternating so that the machine's drift falls on all of them."""
    from dsv4.train.trainer import Trainer

    times: dict[str, list[float]] = {d: [] for d in dtypes}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in dtypes:
            model = build()
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, model.args.vocab_size, (stage.batch_size, stage.seq_len + 1), generator=g)
            batch = (tokens[:, :-1], tokens[:, 1:])
            trainer = Trainer(model, stage, Path(tmp) / name, lambda start, b=batch: iter(lambda: b, None), [],
                              DTYPES[name], progress=False)
            runs[name] = (trainer, trainer.batches(0))
            trainer.train_step(runs[name][1])  # untimed: first-touch allocation, kernel selection
        for _ in range(rounds):
            for name, (trainer, micro) in runs.items():
                start = time.perf_counter()
                trainer.train_step(micro)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def training_dtype(setting: str, device: torch.device, build: Callable[[], Transformer], stage: StageConfig,
                   path: Path, budgeted: bool = False, progress: bool = True,
                   measure: Callable[..., dict[str, float]] = time_steps) -> torch.dtype:
    """The run's compute dtype: `setting` when it names one; with 'auto', the one a resumed run chose (`path`),
    else fp32 or bf16 by `dsv4.device.fastest_dtype` where that is clear-cut or the run is short (< MIN_STEPS steps
    and no time budget), else the faster of the two measured training steps (written to `path` with the times)."""
    if setting != "auto":
        return resolve_dtype(setting, device)
    if path.exists():
        return DTYPES[json.loads(path.read_text())["dtype"]]
    if device.type != "cpu":
        choice_name, seconds = ("bf16" if resolve_dtype("auto", device) == torch.bfloat16 else "fp32"), {}
    elif not cpu_bf16_is_fast() or not (budgeted or stage.steps >= MIN_STEPS):
        choice_name, seconds = ("bf16" if cpu_bf16_is_fast() else "fp32"), {}
    else:
        seconds = measure(build, stage)
        choice_name = min(seconds, key=seconds.get)
        if progress:
            print("dtype auto: a training step takes " + ", ".join(f"{s:.3f} s in {d}" for d, s in seconds.items())
                  + f" -> {choice_name}", flush=True)
    atomic_text(path, json.dumps({"dtype": choice_name, "step_seconds": {d: round(s, 4) for d, s in seconds.items()}},
                                 indent=1))
    return DTYPES[choice_name]
