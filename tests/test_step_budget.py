"""Prefill scheduled by cost (dsv4.engine.budget): slices shrink as the context grows and as decode rows fill the
step, the oldest prompt always moves, and however a prompt is sliced the outputs are those of one unchunked prefill."""

import pytest
import torch

from dsv4 import ModelArgs
from dsv4.engine.budget import StepBudget
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.tokenizers.text import IdsOnly
from tests.helpers import random_model
from tests.test_prefix import ids

GREEDY = SamplingParams(temperature=0)


def test_the_cost_model_cuts_slices_by_context_and_decode_rows():
    budget = StepBudget(ModelArgs.from_name("v4-flash"), max_step_tokens=512, speculative=False)
    assert budget.plan([], [(0, 10_000)]) == [512]  # at no context: max_step_tokens positions
    far = budget.plan([], [(100_000, 10_000)])[0]
    assert budget.MIN_SLICE <= far < 512  # attention at 100K of context: each position costs more
    assert budget.slice(far, 100_000) <= budget.total < budget.slice(far + 1, 100_000)
    beside = budget.plan([1000] * 64, [(0, 10_000)])[0]
    assert beside < 512 and beside == budget.fit(budget.total - 64 * budget.position(1000), 0, 10_000)
    # a full step: the oldest prompt still moves (MIN_SLICE), the next waits; a short prompt runs whole
    assert budget.plan([50_000] * 2048, [(0, 10_000), (0, 10_000)]) == [budget.MIN_SLICE, 0]
    assert budget.plan([], [(0, 7)]) == [7]
    with pytest.raises(ValueError, match="max_step_tokens must be >= 1"):
        StepBudget(ModelArgs.from_name("tiny"), 0, False)


@pytest.mark.parametrize("speculative", [False, True])
@torch.no_grad()
def test_budgeted_slices_equal_an_unchunked_prefill(speculative):
    """A long prompt arrives while another request decodes: with a budget of 6 positions it runs in short slices
    (never more than a slice a step, and the decoding request gets a token every step); both outputs equal those of
    an engine that prefills each prompt in one piece."""
    model = random_model(0)
    long, short = ids(150, 7), ids(20, 8)
    whole = Engine(model, IdsOnly(), max_batch=1, prefill_chunk=256, speculative=speculative)
    want = [whole.generate([p], GREEDY, max_new_tokens=12, ignore_eos=True)[0] for p in (short, long)]
    engine = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=64, max_step_tokens=6, speculative=speculative)
    first = engine.submit(short, GREEDY, max_new_tokens=12 if not speculative else 40, ignore_eos=True)
    while first.prefilling or first.pending is None:
        engine.step()
    second = engine.submit(long, GREEDY, max_new_tokens=12, ignore_eos=True)
    engine.step()  # admitted
    slices = []
    while second.prefilling:
        before, made = second.pos, len(first.output)
        engine.step()
        slices.append(second.pos - before)
        assert len(first.output) > made or first.finish_reason is not None  # the stream never waits a step
    assert max(slices) <= 6 and len(slices) >= 150 // 6
    while engine.has_work():
        engine.step()
    assert first.output[:12] == want[0].token_ids and second.output == want[1].token_ids


@torch.no_grad()
def test_rows_near_the_end_of_the_cache_are_not_padded_past_it():
    """A prompt's last few positions near the end of the cache, in the same step as another prompt's wide slice:
    padded to that width they would run past the cache; they run on their own, and both answers are right."""
    model = random_model(0)
    a, b = ids(35, 9), ids(30, 10)
    engine = Engine(model, IdsOnly(), max_batch=2, max_len=40, prefill_chunk=32, max_step_tokens=32)
    first = engine.submit(a, GREEDY, max_new_tokens=4, ignore_eos=True)
    engine.step()
    assert first.pos == 32  # 3 positions left, at 32 of 40
    second = engine.submit(b, GREEDY, max_new_tokens=4, ignore_eos=True)
    while engine.has_work():
        engine.step()
    alone = Engine(model, IdsOnly(), max_batch=1, max_len=40, prefill_chunk=64)
    assert [first.output, second.output] == [c.token_ids for c in alone.generate([a, b], GREEDY, max_new_tokens=4,
                                                                                   ignore_eos=True)]
