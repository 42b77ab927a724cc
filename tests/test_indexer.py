"""dsv4.model.indexer: the lightning indexer's scores and selection against the docstring's formula written as loops,
with the plain and the fused products, and its forward against scoring everything at once."""

import pytest
import torch

from dsv4.kernels.fused import Fused, Products
from dsv4.kernels.topk import topk_recent
from dsv4.model.indexer import Indexer
from tests.helpers import tiny_args


@pytest.mark.parametrize("ops", [Products, Fused])
@pytest.mark.parametrize("per_row", [False, True])
def test_scores_and_selection_are_the_formula(ops, per_row):
    """I[t, s] = sum_h w_{t,h} relu(q_{t,h} . K_s) for visible s < (t+1) // m, -inf beyond; the selection is the
    recency-tie-broken top-k of the visible entries, -1 where fewer are visible."""
    ix = Indexer(tiny_args(index_topk=4))
    ix.ops = ops
    g = torch.Generator().manual_seed(int(per_row))
    B, s, H, c, T = 2, 5, ix.n_heads, ix.head_dim, 9
    q, keys = torch.randn(B, s, H, c, generator=g), torch.randn(B, T, c, generator=g)
    w = torch.randn(B, s, H, generator=g)
    keys[:, 2] = 0  # an entry every head scores 0: ties
    positions = torch.randint(0, 4 * T + 4, (B, s) if per_row else (s,), generator=g)
    scores = ix.scores(q, keys, w, positions)
    idx = ix.select(scores, positions)
    pos = positions.expand(B, s)
    for b in range(B):
        for t in range(s):
            visible = (int(pos[b, t]) + 1) // ix.ratio
            want = torch.full((T,), float("-inf"))
            for e in range(min(visible, T)):
                want[e] = sum(w[b, t, h] * torch.relu(q[b, t, h] @ keys[b, e]) for h in range(H))
            torch.testing.assert_close(scores[b, t], want, atol=1e-5, rtol=1e-5)
            chosen = topk_recent(scores[b, t], 4)
            chosen = torch.where(chosen < visible, chosen, -1)
            assert sorted(idx[b, t].tolist()) == sorted(chosen.tolist())


def test_forward_in_query_blocks_equals_one_block():
    torch.manual_seed(0)
    args = tiny_args(index_topk=4)
    ix = Indexer(args, block_size=16)
    for p in ix.parameters():
        torch.nn.init.normal_(p, std=0.2)
    S = 70
    x, qr = torch.randn(1, S, args.dim), torch.randn(1, S, args.q_lora_rank)
    angles = torch.arange(S)[:, None] * torch.rand(args.rope_head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    blocked = ix(x, qr, cos, sin)
    ix.block_size = S
    whole = ix(x, qr, cos, sin)
    assert blocked.shape == (1, S, 4) and torch.equal(blocked.sort(-1).values, whole.sort(-1).values)


@torch.no_grad()
def test_the_scan_warm_up_covers_the_widths_a_context_reaches():
    """Engine.warm_up compiles the scan blocks a server's context will need: a power-of-two width from the smallest
    block up to the context's entries (capped at SCAN_BLOCK), only when the scan is compiled (a copy on the instance,
    as compile_scan leaves it) and the context is long enough to scan at all."""
    indexer = Indexer(tiny_args())
    assert indexer.scan_widths(6272, 512) == []  # not compiled
    calls = []

    def block(q, keys, w, visible, first, best, best_at, ambiguous, sub):
        calls.append(keys.shape[1])
        return Indexer.scan_block(q, keys, w, visible, first, best, best_at, ambiguous, sub)
    indexer.scan_block = block
    assert indexer.scan_widths(6272, 512) == [1024, 2048, 4096, 8192]
    assert indexer.scan_widths(10 ** 6, 512) == [1024 << i for i in range(5)]  # up to SCAN_BLOCK = 16384
    assert indexer.scan_widths(64, 512) == []  # a short context never scans
    indexer.warm_scan([1024, 2048], torch.float32, "cpu")
    assert calls == [1024, 2048]
