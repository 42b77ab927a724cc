"""dsv4.kernels.topk: every fast top-k selects what the sorting twin `topk_recent` selects (the more recent entry wins
ties), eager and compiled, and the exact key orders like (score, index)."""

import pytest
import torch

from dsv4.kernels.topk import exact_key, merge_topk, tied_at_kth, topk_recent, topk_recent_fast


def tie_heavy_scores(g: torch.Generator, shape, trial: int) -> torch.Tensor:
    """Random scores; every third case with many exact zeros (ReLU scores), every third quantised (ties anywhere),
    some -inf (invisible entries)."""
    s = torch.randn(shape, generator=g)
    if trial % 3 == 0:
        s = torch.where(torch.rand(shape, generator=g) < 0.6, torch.zeros_like(s), s)
    elif trial % 3 == 1:
        s = (s * 2).round()
    return s.masked_fill(torch.rand(shape, generator=g) < 0.1, float("-inf"))


def test_exact_key_orders_like_score_then_index():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, float("inf")])
    scores = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))]
    index = torch.arange(len(scores))
    want = sorted(range(len(scores)), key=lambda i: (scores[i].item(), i))  # -0.0 == 0.0: the index decides
    assert exact_key(scores, index).argsort().tolist() == want
    assert exact_key(scores).unique().numel() == len(scores)  # distinct: top-k over them has no ties


def test_tied_at_kth_flags_exactly_the_ambiguous_rows():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0],    # k=2: one of two 1.0s left out -> ambiguous
                           [3.0, 2.0, 1.0, 1.0],    # k=2: the tie is below the cut -> clear
                           [3.0, 1.0, 1.0, 1.0],    # k=2: ambiguous
                           [3.0, float("-inf"), float("-inf"), float("-inf")]])  # -inf ties: the caller drops them
    vals = scores.topk(2, dim=-1).values
    assert tied_at_kth(scores, vals).tolist() == [True, False, True, False]


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_topk_selects_the_sorting_twins_set(compiled):
    fast = torch.compile(topk_recent_fast, dynamic=False, backend="eager") if compiled else topk_recent_fast
    g = torch.Generator().manual_seed(1)
    for trial in range(24):
        T = int(torch.randint(2, 200, (1,), generator=g))
        k = min(int(torch.randint(1, 40, (1,), generator=g)), T)
        s = tie_heavy_scores(g, (2, 9, T), trial)
        got, want = fast(s, k), topk_recent(s, k)
        visible = torch.gather(s, -1, want).isfinite()  # which of the k best are visible (-inf ones: any may come)
        assert torch.equal(got.sort(-1).values[visible.all(-1)], want.sort(-1).values[visible.all(-1)]), trial
        assert torch.equal(torch.gather(s, -1, got).sort(-1).values, torch.gather(s, -1, want).sort(-1).values)


def test_merge_topk_of_blocks_is_the_one_shot_selection():
    """Candidates that carry their own entry indices (as the scan's running top-k does): merging each block's k best
    into a running k best gives the k best by (score, index) of all of them."""
    g = torch.Generator().manual_seed(2)
    for trial in range(12):
        T, k, block = 150, 1 + trial * 3, 32
        s = tie_heavy_scores(g, (3, T), trial).clamp(min=-1e30)  # finite: every candidate is a real one
        best = torch.full((3, 0), float("-inf"))
        best_at = torch.empty(3, 0, dtype=torch.long)
        for j0 in range(0, T, block):
            cand = torch.cat([best, s[:, j0: j0 + block]], -1)
            cand_at = torch.cat([best_at, torch.arange(j0, min(j0 + block, T)).expand(3, -1)], -1)
            best, best_at = merge_topk(cand, cand_at, min(k, cand.shape[-1]))
        assert torch.equal(best_at.sort(-1).values, topk_recent(s, k).sort(-1).values), trial
        assert torch.equal(best, s.gather(-1, best_at))
