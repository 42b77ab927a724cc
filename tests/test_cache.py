"""Incremental decoding over the preallocated cache equals the full-sequence forward, however the sequence is split."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4 import ModelArgs
from dsv4.kernels.fused import fuse_linear_groups
from dsv4.model.cache import KVCache, bytes_per_token
from tests.helpers import PARITY_CONFIGS, random_ids, random_model

MODELS: dict[str, object] = {}


def model_for(name: str):
    if name not in MODELS:
        MODELS[name] = random_model(0, **PARITY_CONFIGS[name])
    return MODELS[name]


def run_steps(model, cache, ids, chunks, slot=0):
    """Feed ids [1, L] through the cache in chunks -> logits [1, L, V] fp32."""
    out, pos = [], 0
    for n in chunks:
        step = model.make_step(cache, torch.tensor([slot]), torch.tensor([pos]), n)
        out.append(model.logits(model.step(ids[:, pos: pos + n], cache, step)).float())
        pos += n
    return torch.cat(out, dim=1)


@st.composite
def split_sequences(draw):
    name = draw(st.sampled_from(sorted(PARITY_CONFIGS)))
    window = model_for(name).args.window_size
    length = draw(st.integers(1, 3 * window + 9))  # crosses the window and both compression ratios
    chunks, left = [], length
    while left:
        n = draw(st.one_of(st.just(1), st.integers(1, left)))  # decode steps mixed with prefill chunks
        chunks.append(min(n, left))
        left -= chunks[-1]
    return name, length, chunks, draw(st.integers(0, 2 ** 16))


@settings(max_examples=60, deadline=None)
@given(split_sequences())
@torch.no_grad()
def test_any_split_equals_full_forward(case):
    name, length, chunks, seed = case
    model = model_for(name)
    ids = random_ids(model.args, 1, length, seed)
    cache = KVCache(model.args, slots=2, max_len=length + 3)
    torch.testing.assert_close(run_steps(model, cache, ids, chunks, slot=1), model(ids).float(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mixed", "window128"])
@torch.no_grad()
def test_ragged_batch_with_uncommitted_columns(name):
    """Rows at different positions decode together; each step feeds 3 columns but commits a different number
    per row (what speculative drafts and padding need); a reused slot forgets its previous sequence."""
    model = model_for(name)
    W = model.args.window_size
    lengths = [3, W + 5, 2 * W + 17]
    total = 2 * W + 40
    seqs = [random_ids(model.args, 1, total, seed=i + 10) for i in range(3)]
    cache = KVCache(model.args, slots=4, max_len=total + 4)
    run_steps(model, cache, random_ids(model.args, 1, 2 * W + 9, seed=99), [2 * W + 9], slot=2)  # a predecessor
    slots = torch.tensor([0, 2, 3])
    for i, (n, slot) in enumerate(zip(lengths, slots.tolist())):
        run_steps(model, cache, seqs[i], [n], slot=slot)
    pos = torch.tensor(lengths)
    got = [[] for _ in seqs]
    g = torch.Generator().manual_seed(0)
    while int(pos.max()) + 3 <= total:
        commit = torch.randint(1, 4, (3,), generator=g)
        ids = torch.stack([seqs[i][0, p: p + 3] for i, p in enumerate(pos.tolist())])
        step = model.make_step(cache, slots, pos, 3, commit)
        logits = model.logits(model.step(ids, cache, step)).float()
        for i in range(3):
            got[i].append(logits[i, : int(commit[i])])
        pos = pos + commit
    for i in range(3):
        full = model(seqs[i][:, : int(pos[i])]).float()[0, lengths[i]:]
        torch.testing.assert_close(torch.cat(got[i]), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_mtp_step_equals_forward():
    model = model_for("mixed")
    L = 45
    ids = random_ids(model.args, 1, L, seed=3)
    _, (mtp_full,) = model(ids, mtp=True)
    cache = KVCache(model.args, slots=1, max_len=L)
    out, pos = [], 0
    for n in [20, 1, 1, 7, 15]:  # the MTP row at i needs token i+1: the step's last row waits for it
        step = model.make_step(cache, torch.tensor([0]), torch.tensor([pos]), n)
        h = model.step(ids[:, pos: pos + n], cache, step)
        nxt = ids[:, pos + 1: pos + n + 1]
        if nxt.shape[1] < n:  # the sequence's last position has no next token: commit one column fewer
            nxt = torch.cat([nxt, nxt.new_zeros(1, n - nxt.shape[1])], dim=1)
        mstep = model.make_step(cache, torch.tensor([0]), torch.tensor([pos]), n, torch.tensor([min(n, L - 1 - pos)]))
        m = model.mtp_step(h, nxt, cache, mstep)
        out.append(model.logits(m, model.mtp[0].hc_head, model.mtp[0].norm).float()[:, : min(n, L - 1 - pos)])
        pos += n
    torch.testing.assert_close(torch.cat(out, dim=1), mtp_full.float(), atol=1e-4, rtol=0)


def test_cache_size_matches_theory():
    args = ModelArgs.from_name("tiny")
    cache = KVCache(args, slots=3, max_len=4096, device="meta", dtype=torch.bfloat16)
    per_token = bytes_per_token(args, torch.bfloat16)
    # tiny: CSA layers 1 and 3 (d=32 entries + 32-dim indexer keys per 4 tokens), HCA layer 2 (32 per 16 tokens)
    assert per_token == 2 * (2 * (32 + 32) / 4 + 32 / 16)
    assert cache.bytes_per_token() == per_token
    grown = KVCache(args, slots=3, max_len=8192, device="meta", dtype=torch.bfloat16)
    assert grown.nbytes() - cache.nbytes() == 4 * 4096 * per_token  # slots + the spare one
    fixed = cache.fixed_bytes_per_sequence()
    assert cache.nbytes() == 4 * (fixed + 4096 * per_token)


def test_step_checks_its_bounds():
    model = model_for("mixed")
    cache = KVCache(model.args, slots=1, max_len=8)
    with pytest.raises(ValueError, match="beyond the cache's max_len 8"):
        model.make_step(cache, torch.tensor([0]), torch.tensor([6]), 3)
    with pytest.raises(ValueError, match="at least one slot"):
        KVCache(model.args, slots=0, max_len=8)


@torch.no_grad()
def test_fused_projections_change_nothing_but_the_products():
    import copy

    model = copy.deepcopy(model_for("mixed"))
    ids = random_ids(model.args, 1, 45, seed=4)
    want = model(ids).float()
    fuse_linear_groups(model)
    attn = model.layers[1].attn  # a CSA layer: 7 projections of x in one block
    block = attn.x_group.block
    assert block is not None and block.shape[0] == sum(m.out_features for m in attn.x_group.linears)
    assert attn.wq_a.weight.data_ptr() == block.data_ptr()  # a view of the block, not a copy
    assert attn.indexer.weights_proj.weight.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
    cache = KVCache(model.args, slots=1, max_len=45)
    torch.testing.assert_close(run_steps(model, cache, ids, [20, 1, 1, 23]), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(model(ids).float(), want, atol=1e-5, rtol=0)  # the shared expert runs fused too
