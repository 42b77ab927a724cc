"""Top-k with a deterministic tie-break: among equal scores the more recent entry (the higher index) wins.

    topk_recent(s, k)       = the k largest entries of s by the key (s_i, i)        plain twin: one stable sort
    topk_recent_fast(s, k)  = the same set: torch.topk, then only the rows where the k-th score ties an unselected
                              entry are redone on exact keys (with ReLU scores such ties are common at 0)
    merge_topk(s, idx, k)   = the k best candidates by (s, idx) when the candidates carry their own indices (the
                              long-context scan merges each block's top-k into a running one)

`exact_key` packs (score, index) into one int64 that orders like the pair, so a top-k over it has no ties.
tests/test_topk.py compares every fast path here with `topk_recent`.
"""

import torch


def topk_recent(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the higher index (plain twin, sorts all)."""
    T = scores.shape[-1]
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return T - 1 - order


def topk_recent_fast(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same set as `topk_recent` (order not guaranteed): torch.topk, then the rare rows whose k-th value is tied
    with an unselected entry are redone with an exact (score, index) key. -inf ties are left alone: the caller
    drops entries that are not visible."""
    if torch.compiler.is_compiling():  # no data-dependent rows under compile: the exact key for every row
        return exact_key(scores).topk(k, dim=-1, sorted=False).indices
    if scores.device.type == "meta":
        return scores.topk(k, dim=-1, sorted=False).indices
    return merge_topk(scores, torch.arange(scores.shape[-1], device=scores.device).expand_as(scores), k)[1]


def tied_at_kth(scores: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Rows whose top-k `vals` leave out a candidate tied with their k-th score (finite ties only: -inf entries are
    invisible ones, dropped by the caller) -> [...] bool."""
    kth = vals.min(-1, keepdim=True).values
    return ((scores == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[..., 0])


def exact_key(scores: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys ordered by (score, index): distinct, so top-k on them has no ties and the more recent entry wins.
    index: the entries' indices (distinct, >= 0; default: their positions along the last dim)."""
    bits = scores.float().view(torch.int32).long()
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotone in the float value
    if index is None:
        index = torch.arange(scores.shape[-1], device=scores.device)
    return key * (1 << 31) + index  # then the higher index wins (|key| < 2^31, index < 2^31: no overflow)


def merge_topk(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates by (score, index): scores [..., n] fp32 and their entries' indices [..., n] (distinct)
    -> (scores [..., k], indices [..., k]), in no particular order. torch.topk first; the rare rows whose k-th score is
    tied with an unselected candidate are redone on exact keys (-inf ties are left alone: those are invisible)."""
    vals, at = scores.topk(k, dim=-1, sorted=False)
    ambiguous = tied_at_kth(scores, vals)
    if ambiguous.any():
        at[ambiguous] = exact_key(scores[ambiguous], index[ambiguous]).topk(k, dim=-1, sorted=False).indices
        vals = scores.gather(-1, at)
    return vals, index.gather(-1, at)
