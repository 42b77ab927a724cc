"""`dsv4 train --time-budget`: durations, the one decision of the number of steps (on a simulated clock, over many
machines), and a trainer that keeps an earlier decision and ends on time."""

import dataclasses
import json
import random
import time

import pytest
import torch

from dsv4.cli import parser
from dsv4.config import ModelArgs
from dsv4.train.budget import OPEN, StepBudget, parse_duration
from dsv4.train.config import TrainConfig
from dsv4.train.optim import wsd_schedule
from dsv4.train.pipeline import build_model
from dsv4.train.plots import read_metrics
from dsv4.train.trainer import Trainer
from tests.test_train import fixed_batches


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("1h30m", 5400), ("600", 600), ("1.5m", 90),
                                           (" 2h ", 7200), ("1m 30s", 90), (45, 45)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten", "-5m", "0", "0m", "10x", "m", "5m later", -3])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration(bad)


def simulate(b: StepBudget, rng: random.Random, compile_s: float, dt: float, jitter: float):
    """Steps on a fake clock until the budget decides: the first step compiles, then dt +- jitter each."""
    now, step, decision = b.started, 0, None
    while decision is None:
        step += 1
        now += compile_s + dt if step == 1 else dt * rng.uniform(1 - jitter, 1 + jitter)
        decision = b.observe(step, now)
        assert step < 10**6
    return decision, step, now


def test_the_decided_steps_fill_the_budget_and_no_more(tmp_path):
    rng = random.Random(0)
    for i in range(300):
        total, tokens = rng.uniform(60, 3600), rng.choice([2048, 4096, 16384])
        dt = rng.uniform(total / 5000, total / 150)
        reserve = rng.choice([0, 20 * tokens, 60 * tokens])
        b = StepBudget(deadline=total, path=tmp_path / f"{i}.json", tokens_per_step=tokens,
                       schedule=rng.choice(["cosine", "wsd"]), warmup=rng.randint(4, 30), reserve_tokens=reserve,
                       decay_frac=rng.choice([0.2, 0.4, 0.5]), started=0.0)
        decision, step, now = simulate(b, rng, compile_s=rng.uniform(0, 0.25 * total), dt=dt, jitter=0.02)
        finish = now + (decision.steps - step) * dt + reserve / tokens * dt
        assert finish <= total, (i, finish, total)  # ends on time ...
        assert finish >= total - (b.margin + 0.03) * (total - now) - dt, (i, finish, total)  # ... using the time
        if b.schedule == "cosine":  # decided when the warm-up ends: no step ran with an lr that depends on it
            assert decision.at_step == b.warmup
        else:  # decided before the decay starts: every step so far had lr 1 (flat), whatever the total
            assert all(wsd_schedule(s, b.warmup, decision.steps, b.decay_frac) == 1.0
                       for s in range(b.warmup, step + 1))
            # ... and not before `measure` of pretraining's own time (less while the decay is long) had passed
            assert now >= min(b.measure, 0.7 * (1 - b.decay_frac)) * (total - decision.reserved_s) - 0.1
        assert json.loads(b.path.read_text())["steps"] == decision.steps == b.load().steps


def test_a_host_that_drifts_after_the_decision_still_ends_on_time(tmp_path):
    """wsd: the host runs 15% faster or 20% slower after the decision (snapshots of a big table, a busy neighbour);
    the revisions while the lr is flat refit the rest, without changing any lr already used."""
    rng = random.Random(1)
    for i in range(200):
        total, tokens = rng.uniform(300, 3600), 4096
        dt = rng.uniform(total / 3000, total / 300)
        reserve = rng.choice([0, 20 * tokens])
        b = StepBudget(deadline=total, path=tmp_path / f"{i}.json", tokens_per_step=tokens, schedule="wsd",
                       warmup=rng.randint(4, 30), reserve_tokens=reserve, started=0.0)
        first, step, now = simulate(b, rng, compile_s=rng.uniform(0, 0.1 * total), dt=dt, jitter=0.02)
        slow = dt * rng.choice([0.85, 1.2])
        decisions = [first]
        while step < decisions[-1].steps:
            step += 1
            now += slow * rng.uniform(0.98, 1.02)
            revised = b.observe(step, now)
            if revised is not None:
                assert revised.revision > 0 and revised.at_step == step
                decisions.append(revised)
        steps, last = decisions[-1].steps, b.load()
        assert last.revision > 0 and last.steps == steps
        finish = now + reserve / tokens * slow
        assert finish <= total, (i, finish, total)
        assert finish >= total - (b.margin + 0.05) * (total - (last.at_step * dt)) - 2 * slow, (i, finish, total)
        # every step before a revision ran at the flat lr under the schedule in force then, and under the new one
        for old, new in zip(decisions, decisions[1:] + [last]):
            assert all(wsd_schedule(s, b.warmup, old.steps) == wsd_schedule(s, b.warmup, new.steps) == 1.0
                       for s in range(b.warmup, new.at_step + 1))


def test_a_budget_too_small_still_trains_past_the_decision(tmp_path):
    b = StepBudget(deadline=10.0, path=tmp_path / "b.json", tokens_per_step=4096, schedule="wsd", warmup=5,
                   started=0.0)
    decision, step, _ = simulate(b, random.Random(1), compile_s=30.0, dt=1.0, jitter=0.0)
    assert decision.steps > step and decision.seconds_left < 0


def tiny_trainer(tmp_path, **stage):
    from dsv4.train.config import StageConfig

    args = ModelArgs.from_name("tiny")
    cfg = StageConfig(batch_size=2, seq_len=32, warmup=4, eval_every=1000, save_every=1000, eval_batches=1,
                      indexer_warmup=0, **stage)
    data = fixed_batches(args, 400, 2, 32)
    val = list(data(0))[:1]
    model = build_model(args, torch.device("cpu"), seed=0)
    return Trainer(model, cfg, tmp_path, data, val, torch.float32, progress=False)


def test_a_trainer_ends_on_time_and_a_resumed_one_keeps_the_decision(tmp_path):
    t = tiny_trainer(tmp_path / "a", schedule="cosine")
    budget = StepBudget(deadline=time.monotonic() + 4.0, path=tmp_path / "a" / "budget.json",
                        tokens_per_step=t.cfg.tokens_per_step, schedule="cosine", warmup=4)
    start = time.monotonic()
    t.fit(budget)
    elapsed = time.monotonic() - start
    decided = budget.load()
    rows = read_metrics(t.metrics_path)
    assert decided.at_step == 4 and decided.steps > 8 and [r["step"] for r in rows] == list(range(1, decided.steps + 1))
    assert elapsed < 4.0 + 1.5  # the budget plus the final evaluation and snapshot
    assert "val_loss_start" in rows[0] and rows[0]["val_loss_start"] > rows[-1]["val_loss"]

    # a run whose budget.json exists (a killed try decided already) trains exactly that many steps, on any clock
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "budget.json").write_text(json.dumps({**dataclasses.asdict(decided), "steps": 7}))
    t = tiny_trainer(tmp_path / "b", schedule="cosine")
    late = StepBudget(deadline=time.monotonic() - 100, path=tmp_path / "b" / "budget.json",
                      tokens_per_step=t.cfg.tokens_per_step, schedule="cosine", warmup=4)
    t.fit(late)
    assert t.step == t.cfg.steps == 7 and t.cfg.steps != OPEN


def test_steps_and_a_time_budget_together_are_refused():
    from dsv4.cli import train_config

    opts = parser().parse_args(["train", "--steps", "50", "--time-budget", "10m"])
    with pytest.raises(ValueError, match="not both"):
        train_config(opts)
    cfg = train_config(parser().parse_args(["train", "--time-budget", "1h30m"]))
    assert cfg.time_budget == 5400 and cfg.pretrain.steps == 0
    default = train_config(parser().parse_args(["train"]))  # what make run trains: v4-2m for 10 minutes
    assert (default.time_budget, default.preset, default.out, default.pretrain.steps) == (
        600, "v4-2m-engram", "runs/v4-2m-engram", 0)
    fixed = train_config(parser().parse_args(["train", "--preset", "small", "--steps", "100"]))
    assert (fixed.time_budget, fixed.out, fixed.pretrain.steps) == (None, "runs/small", 100)
    assert default.pretrain.decay_frac == 0.2
    assert train_config(parser().parse_args(["train", "--decay-frac", "0.4"])).pretrain.decay_frac == 0.4


def test_a_cosine_budget_needs_a_warm_up_to_measure_in(tmp_path):
    from dsv4.train.config import StageConfig, TrainConfig
    from dsv4.train.pipeline import run

    cfg = TrainConfig(out=str(tmp_path / "run"), preset="tiny", time_budget=60.0,
                      pretrain=StageConfig(steps=0, schedule="cosine", warmup=2))
    with pytest.raises(ValueError, match="warm-up"):
        run(cfg, progress=False)


def test_short_stages_run_eagerly_unless_told_otherwise():
    from dsv4.device import can_compile
    from dsv4.train.pipeline import COMPILE_MIN_BUDGET, COMPILE_MIN_STEPS, compile_enabled

    cpu = torch.device("cpu")
    assert not compile_enabled("auto", cpu, torch.bfloat16, COMPILE_MIN_STEPS - 1)  # compiling would cost more
    assert not compile_enabled("auto", cpu, torch.float32, None)
    assert not compile_enabled("auto", cpu, torch.bfloat16, None, 600.0)  # make run's 10 minutes: eager is faster
    assert compile_enabled("auto", cpu, torch.bfloat16, None, COMPILE_MIN_BUDGET) == can_compile(cpu)
    assert compile_enabled("on", cpu, torch.float32, 1) and not compile_enabled("off", cpu, torch.bfloat16, None)
    with pytest.raises(ValueError, match="auto, on or off"):
        compile_enabled("yes", cpu, torch.bfloat16, None)


def test_auto_dtype_measures_where_bf16_is_native_and_keeps_its_choice_on_resume(tmp_path, monkeypatch):
    """--dtype auto: where the matmul says bf16 is native, the faster measured step wins (either way), is written
    down and read back on --resume without measuring again; a named dtype, an emulated bf16 or a short run measure
    nothing."""
    import dsv4.train.autodtype as autodtype

    cpu, stage = torch.device("cpu"), dataclasses.replace(TrainConfig().pretrain, steps=100)
    calls = []

    def fake(times):
        return lambda build, stage: calls.append(1) or times

    monkeypatch.setattr(autodtype, "cpu_bf16_is_fast", lambda: True)
    for times, want in (({"bf16": 0.4, "fp32": 0.5}, torch.bfloat16), ({"bf16": 0.7, "fp32": 0.5}, torch.float32)):
        path = tmp_path / f"{want}.json"
        assert autodtype.training_dtype("auto", cpu, None, stage, path, measure=fake(times)) == want
        assert json.loads(path.read_text())["step_seconds"] == times
        assert autodtype.training_dtype("auto", cpu, None, stage, path, measure=fake({"bf16": 9, "fp32": 9})) == want
    assert len(calls) == 2  # the resumed calls read the file
    short = dataclasses.replace(stage, steps=10)
    assert autodtype.training_dtype("auto", cpu, None, short, tmp_path / "s.json", measure=fake({})) == torch.bfloat16
    assert autodtype.training_dtype("auto", cpu, None, short, tmp_path / "b.json", budgeted=True,
                                    measure=fake({"bf16": 0.7, "fp32": 0.5})) == torch.float32
    assert autodtype.training_dtype("fp32", cpu, None, stage, tmp_path / "n.json", measure=fake({})) == torch.float32
    monkeypatch.setattr(autodtype, "cpu_bf16_is_fast", lambda: False)
    assert autodtype.training_dtype("auto", cpu, None, stage, tmp_path / "e.json", measure=fake({})) == torch.float32
    assert len(calls) == 3 and not (tmp_path / "n.json").exists()


def test_the_dtype_probe_times_real_steps_of_each_dtype():
    args = ModelArgs.from_name("tiny")
    stage = dataclasses.replace(TrainConfig().pretrain, batch_size=2, seq_len=32)
    from dsv4.train.autodtype import time_steps

    seconds = time_steps(lambda: build_model(args, torch.device("cpu"), 0), stage, rounds=1)
    assert set(seconds) == {"bf16", "fp32"} and all(0 < s < 60 for s in seconds.values())
