"""Prefix caching (dsv4.engine.prefix): a request restored from a snapshot continues exactly as one that prefilled its
whole prompt; snapshots are shared along a path, evicted least recently used within the budget, and never broken."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.tokenizers.text import IdsOnly
from tests.helpers import random_model

GREEDY = SamplingParams(temperature=0)
CHUNK = 24  # prefill chunk: not a multiple of the HCA ratio (16), so snapshots fall inside and on its windows


MODELS = {}


def model_for(name: str):
    """tiny: [SWA, CSA(4), HCA(16), CSA(4)], a 16-token window and an MTP layer; engram: also Engram (with its short
    convolution) at layer 1."""
    if name not in MODELS:
        extra = dict(engram_layers=[1], engram_vocab=[97, 101], engram_dim=32, engram_heads=2, engram_conv=True)
        MODELS[name] = random_model(0, **(extra if name == "engram" else {}))
    return MODELS[name]


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, prompt: list[int], n: int = 8):
    return engine.generate([prompt], GREEDY, max_new_tokens=n, ignore_eos=True, logprobs=3)[0]


def assert_same(a, b):
    """Same tokens; log-probabilities (chosen and top 3) equal up to fp32 rounding: a restored request runs its first
    chunk from the snapshot's position, so that chunk's products have another shape than a whole prefill's."""
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert abs(x["logprob"] - y["logprob"]) < 1e-5
        assert [t for t, _ in x["top"]] == [t for t, _ in y["top"]]


@pytest.mark.parametrize("name", ["tiny", "engram"])
@pytest.mark.parametrize("speculative", [False, True])
@torch.no_grad()
def test_restored_state_is_the_prefilled_state(name, speculative):
    """The slot a hit restores holds bit for bit what prefilling the prefix built: rings (window, compressor and
    indexer rows, Engram's), every closed entry, for prefixes ending inside a compression window and on one (37: inside
    CSA's and HCA's windows; 48 = 3 HCA windows; 72 = 3 chunks), past the window and across chunks."""
    model = model_for(name)
    for length in (37, 48, 72):
        prompt = ids(length + 5, length)
        engine = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=CHUNK, speculative=speculative,
                        prefix_cache_gb=0.01)
        req = engine.submit(prompt[:length], GREEDY, max_new_tokens=4, ignore_eos=True)
        while req.prefilling:
            engine.step()
        built = [t[req.slot].clone() for t in engine.prefix.rings]
        closed = [buf[req.slot, : length // m].clone() for buf, m in engine.prefix.entry_buffers]
        hit = engine.prefix.lookup(prompt)  # the longer prompt shares `length` tokens with the prompt's snapshot
        assert hit is not None and hit.position == length and hit.snapshot.committed == length
        other = 1 - req.slot
        engine.prefix.restore(hit, other)
        assert all(torch.equal(t[other], b) for t, b in zip(engine.prefix.rings, built))
        buffers = engine.prefix.entry_buffers
        assert all(torch.equal(buf[other, : length // m], c) for (buf, m), c in zip(buffers, closed))
        if speculative:  # the MTP module's input at the last position comes with it
            assert hit.hidden is not None and hit.hidden.shape == (model.args.hc_mult, model.args.dim)


@pytest.mark.parametrize("speculative", [False, True])
def test_reuse_gives_the_logits_of_no_reuse(speculative):
    """Multi-turn chat (the next prompt extends a finished prompt + answer), a shared prefix ending mid-window and on a
    chunk end, a repeated prompt (restored one position early) and a prompt that is a prefix of a served one: every
    hit continues as prefilling from scratch does."""
    model = model_for("engram")
    cached = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=CHUNK, speculative=speculative,
                    prefix_cache_gb=0.01)
    plain = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=CHUNK, speculative=speculative)
    first = ids(61, 1)
    answer = run(cached, first, 10)
    assert_same(answer, run(plain, first, 10))
    turn2 = first + answer.token_ids + ids(9, 2)  # the chat's next turn
    shared = first[:37] + ids(30, 3)  # shares 37 tokens: the snapshot at the chunk end 24 serves it
    on_chunk = first[:48] + ids(5, 4)
    for prompt, reused in ((turn2, 61 + 9), (shared, 24), (on_chunk, 48), (first, 60), (first[:50], 48)):
        before = cached.prefix.stats.tokens_reused
        assert_same(run(cached, prompt), run(plain, prompt))
        assert cached.prefix.stats.tokens_reused - before == reused, prompt
    assert cached.stats["prefill_tokens"] < plain.stats["prefill_tokens"]


@settings(max_examples=12, deadline=None)
@given(st.data())
@torch.no_grad()
def test_tiny_budgets_evict_and_stay_exact(data):
    """Prompts built from a few shared stems, through 2 slots, under budgets from one snapshot's size up: what comes
    out is what an engine without a cache gives; the cache never holds more than its budget, and evicts."""
    model = model_for("tiny")
    speculative = data.draw(st.booleans())
    stems = [ids(n, seed) for seed, n in enumerate(data.draw(st.lists(st.integers(20, 60), min_size=1, max_size=3)))]
    prompts = []
    for _ in range(data.draw(st.integers(3, 6))):
        stem = data.draw(st.sampled_from(stems))
        cut = data.draw(st.integers(1, len(stem)))
        prompts.append(stem[:cut] + ids(data.draw(st.integers(0, 12)), len(prompts) + 100))
    cached = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=data.draw(st.sampled_from([8, 16, 24])),
                    speculative=speculative, prefix_cache_gb=1e-9)
    one = sum(t[0].numel() * t.element_size() for t in cached.prefix.rings)
    cached.prefix.budget = int(one * data.draw(st.floats(1.1, 6)))
    plain = Engine(model, IdsOnly(), max_batch=2, prefill_chunk=cached.prefill_chunk, speculative=speculative)
    for a, b in zip(cached.generate(prompts, GREEDY, max_new_tokens=6, ignore_eos=True),
                    plain.generate(prompts, GREEDY, max_new_tokens=6, ignore_eos=True)):
        assert a.token_ids == b.token_ids
    assert cached.prefix.nbytes <= cached.prefix.budget
    kept = [s for v in cached.prefix.snapshots.values() for s in v]
    assert all(s.refs == sum(c.parent is s for c in kept) for s in kept)  # finished requests hold none
    assert all(s.parent in kept for s in kept if s.parent is not None)  # no chain is broken
    assert cached.prefix.stats.evicted > 0


@pytest.mark.parametrize("speculative", [False, True])
def test_prompts_admitted_together_share_their_first_chunks(speculative):
    """n choices of one prompt (or prompts sharing a start) arrive together: the budget runs one at a time, and each
    waiting one looks again before its first slice, continuing from the chunks the first one saved."""
    model = model_for("tiny")
    prompt = ids(90, 11)
    engine = Engine(model, IdsOnly(), max_batch=3, prefill_chunk=24, max_step_tokens=24, speculative=speculative,
                    prefix_cache_gb=0.01)
    plain = run(Engine(model, IdsOnly(), max_batch=1, prefill_chunk=24, speculative=speculative), prompt)
    outs = engine.generate([prompt, prompt, prompt[:80] + ids(5, 12)], GREEDY, max_new_tokens=8, ignore_eos=True,
                           logprobs=3)
    assert_same(outs[0], plain)
    assert_same(outs[1], plain)
    reused = engine.prefix.stats.tokens_reused
    assert engine.stats["cached_tokens"] == reused >= 2 * 24  # the 2nd and the 3rd started at least a chunk in
    assert engine.prefix.stats.lookups == 3  # one per request, however often each looked again
    assert engine.stats["prefill_tokens"] == 90 + 90 + 85 - reused


def test_a_bad_budget_is_refused():
    with pytest.raises(ValueError, match="budget > 0"):
        from dsv4.engine.prefix import PrefixCache
        engine = Engine(model_for("tiny"), IdsOnly(), max_batch=1)
        PrefixCache(engine.cache, 0, 4, False)
