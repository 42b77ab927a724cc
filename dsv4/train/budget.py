"""A training run that ends on time: `dsv4 train --time-budget 10m`.

The budget covers the whole pipeline from the moment it starts (tokenizer, token files, every stage, the final
checkpoint). Pretraining starts with an open number of steps; it measures its own step time and then fixes the number
of steps, once:

    pretraining steps = step now + (time left - what the later stages need) / seconds per step
    seconds per step  = the mean over the steps since the first `skip` (compilation), evaluations and snapshots included
    later stages      = their optimizer steps x tokens per step, at pretraining's seconds per token

When the decision is taken depends on the schedule, so that no step runs with a learning rate that depends on it:
    cosine  at the end of the warm-up (the warm-up's ramp does not depend on the total)
    wsd     at the end of the warm-up once `measure` of the pretraining budget (the whole budget less what the later
            stages need) has passed (the lr stays flat until the decay starts, `decay_frac` of the steps from the end,
            and the total is kept large enough that the decay starts after the decision)
With wsd the decision is revised while the lr is still flat, at the midpoint between the last decision and the decay's
start (while that is >= 10 steps away) and at the last flat step (at most MAX_REVISIONS times): the steps since the
last decision give a fresh rate (hosts drift by 10-20% within minutes; snapshots of a large Engram table cost more
than the first steps showed), and the remaining steps are fitted again; every step so far ran at the flat peak lr,
whatever the total.
Each decision is written to OUT/pretrain/budget.json before the next step, so `--resume` continues with exactly the
same schedule (a resumed run keeps the steps on disk, never revises, and no longer fits the original clock).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsv4.atomic import atomic_text
from dsv4.train.optim import WSD_DECAY_FRAC, wsd_decay_start

OPEN = 10**9  # the step count of a stage whose length is not decided yet
MAX_REVISIONS = 4

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
    revision: int = 0  # 0 = the first decision, then each revision (wsd)


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
    _decision: Decision | None = None  # taken in this process (None after a resume: the file's is kept)

    def load(self) -> Decision | None:
        """The decision an earlier (killed) try of this run took, if any."""
        if not self.path.exists():
            return None
        return Decision(**json.loads(self.path.read_text()))

    def reserved(self, dt: float) -> float:
        """Seconds the later stages need at `dt` seconds per step."""
        return self.reserve_tokens / self.tokens_per_step * dt

    def estimate(self, since: int = 0) -> tuple[float, int] | None:
        """(seconds per step, steps that fit) from the steps seen so far (from step `since` on); None before two
        measured steps."""
        times = [(s, t) for s, t in self._times if s >= since]
        if len(times) < 2:
            return None
        (s0, t0), (s1, t1) = times[0], times[-1]
        if s1 <= s0:
            return None
        dt = (t1 - t0) / (s1 - s0)
        fit = int(((self.deadline - t1) * (1 - self.margin) - self.reserved(dt)) / dt)
        return dt, s1 + max(fit, 0)

    @property
    def revisable(self) -> bool:
        """Whether a decision taken in this process may still be revised (wsd)."""
        return self.schedule == "wsd" and self._decision is not None and self._decision.revision < MAX_REVISIONS

    def observe(self, step: int, now: float | None = None) -> Decision | None:
        """Call after each finished step (`step` steps done); returns the Decision when one is taken (then saved):
        the first, and with wsd its revisions (returned only when they change the steps)."""
        now = time.monotonic() if now is None else now
        if step >= self.skip:
            self._times.append((step, now))
        if self._decision is not None:
            return self._revise(step, now) if self.revisable else None
        if not self._ready(step, now):
            return None
        est = self.estimate()
        return None if est is None else self._decide(step, now, *est)

    def _decide(self, step: int, now: float, dt: float, steps: int, revision: int = 0) -> Decision:
        steps = max(steps, step + 1)
        if self.schedule == "wsd":  # the decay must start after this step, as it would have with the open count
            while wsd_decay_start(steps, self.decay_frac) <= step:
                steps += 1
        self._decision = Decision(steps=steps, at_step=step, sec_per_step=round(dt, 4),
                                  tokens_per_s=round(self.tokens_per_step / dt, 1),
                                  seconds_left=round(self.deadline - now, 1), reserved_s=round(self.reserved(dt), 1),
                                  revision=revision)
        atomic_text(self.path, json.dumps(asdict(self._decision), indent=1))
        return self._decision

    def _revise(self, step: int, now: float) -> Decision | None:
        """Midway to the decay's start and at its last flat step, fit the remaining steps again at the rate since the
        last decision."""
        last = self._decision
        decay = wsd_decay_start(last.steps, self.decay_frac)
        mid = (last.at_step + decay) // 2
        if step != decay - 1 and not (step == mid and mid - last.at_step >= 10):
            return None
        est = self.estimate(since=last.at_step) or (last.sec_per_step, last.steps)
        revised = self._decide(step, now, *est, revision=last.revision + 1)
        return revised if revised.steps != last.steps else None

    def _ready(self, step: int, now: float) -> bool:
        """cosine: the warm-up is over; wsd: besides, `measure` of pretraining's own time (the later stages' share
        left out, at the rate so far) has passed, and less where the decay is long (so it still starts after)."""
        if step < max(self.warmup, self.skip + 2):
            return False
        if self.schedule == "cosine":
            return True
        est = self.estimate()
        own = self.deadline - self.started - (self.reserved(est[0]) if est else 0.0)
        return now - self.started >= min(self.measure, 0.7 * (1 - self.decay_frac)) * own
