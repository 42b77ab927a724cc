"""A training run that ends on time: `dsv4 train --time-budget 10m`.

The budget covers the whole pipeline from the moment it starts (tokenizer, token files, every stage, the final
checkpoint). Pretraining starts with an open number of steps; it measures its own step time and then fixes the number
of steps, once:

    pretraining steps = step now + (time left - what the later stages need) / seconds per step
    seconds per step  = the mean over the steps since the first `skip` (compilation), evaluations and snapshots included
    later stages      = their optimizer steps x tokens per step, at pretraining's seconds per token

When the decision is taken depends on the schedule, so that no step runs with a learning rate that depends on it:
    cosine  at the end of the warm-up (the warm-up's ramp does not depend on the total)
    wsd     at the end of the warm-up once `measure` of the pretraining budget has passed (the lr stays flat until the
            decay starts, and the total is kept large enough that the decay starts after the decision)
The decision is written to OUT/pretrain/budget.json before the next step, so `--resume` continues with exactly the
same schedule (a resumed run keeps its steps and no longer fits the original clock).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsv4.atomic import atomic_text
from dsv4.train.optim import WSD_DECAY_FRAC

OPEN = 10**9  # the step count of a stage whose length is not decided yet

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float) -> float:
    """'10m' | '90s' | '1h30m' | '600' (seconds) -> seconds (> 0)."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh]?)", s)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh]?)", "", s).strip():
            raise ValueError(f"a duration is like 10m, 90s, 1h30m or 600 (seconds), got {text!r}")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"a time budget must be positive, got {text!r}")
    return seconds


@dataclass
class Decision:
    """What was decided, kept in budget.json."""
    steps: int
    at_step: int
    sec_per_step: float
    tokens_per_s: float
    seconds_left: float
    reserved_s: float


@dataclass
class StepBudget:
    """Decides one stage's number of steps from its measured step time (see the module docstring).

    deadline: time.monotonic() by which the whole run should end; reserve_tokens: tokens the later stages will train
    on; margin: share of the time left kept free (final save, plots, the noise of the measurement)."""
    deadline: float
    path: Path
    tokens_per_step: int
    schedule: str
    warmup: int
    reserve_tokens: int = 0
    margin: float = 0.04
    skip: int = 2
    measure: float = 0.35
    decay_frac: float = WSD_DECAY_FRAC
    started: float = field(default_factory=time.monotonic)
    _times: list[tuple[int, float]] = field(default_factory=list)

    def load(self) -> Decision | None:
        """The decision an earlier (killed) try of this run took, if any."""
        if not self.path.exists():
            return None
        return Decision(**json.loads(self.path.read_text()))

    def reserved(self, dt: float) -> float:
        """Seconds the later stages need at `dt` seconds per step."""
        return self.reserve_tokens / self.tokens_per_step * dt

    def estimate(self) -> tuple[float, int] | None:
        """(seconds per step, steps that fit) from the steps seen so far; None before two measured steps."""
        if len(self._times) < 2:
            return None
        (s0, t0), (s1, t1) = self._times[0], self._times[-1]
        if s1 <= s0:
            return None
        dt = (t1 - t0) / (s1 - s0)
        fit = int(((self.deadline - t1) * (1 - self.margin) - self.reserved(dt)) / dt)
        return dt, s1 + max(fit, 0)

    def observe(self, step: int, now: float | None = None) -> Decision | None:
        """Call after each finished step (`step` steps done); returns the Decision when it is taken (then saved)."""
        now = time.monotonic() if now is None else now
        if step >= self.skip:
            self._times.append((step, now))
        if not self._ready(step, now):
            return None
        est = self.estimate()
        if est is None:
            return None
        dt, steps = est
        if self.schedule == "wsd":  # the decay must start after this step, as it would have with the open count
            steps = max(steps, math.ceil((step + 1) / (1 - self.decay_frac)) + 1)
        steps = max(steps, step + 1)
        decision = Decision(steps=steps, at_step=step, sec_per_step=round(dt, 4),
                            tokens_per_s=round(self.tokens_per_step / dt, 1),
                            seconds_left=round(self.deadline - now, 1), reserved_s=round(self.reserved(dt), 1))
        atomic_text(self.path, json.dumps(asdict(decision), indent=1))
        return decision

    def _ready(self, step: int, now: float) -> bool:
        if step < max(self.warmup, self.skip + 2):
            return False
        return self.schedule == "cosine" or now - self.started >= self.measure * (self.deadline - self.started)
