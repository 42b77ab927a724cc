"""Lightning indexer of compressed sparse attention (DeepSeek-V3.2 / V4): picks, for every query, the top-k
compressed entries it will attend to.

    K^I_s = Compressor_{index_head_dim}(x)_s                           (overlapping, like the CSA compressor)
    q_{t,h} = RoPE(wq_b(q_lora_t))_h ,   w_{t,h} = weights_proj(x_t)_h / sqrt(index_head_dim * n_heads)
    I[t, s] = sum_h w_{t,h} * relu(q_{t,h} . K^I_s)                     for visible s < (t+1) // m
    selected(t) = top-k_s I[t, s];  slots beyond the visible count are -1.

Tie-break (documented, deterministic): among equal scores the more recent entry (higher s) wins. With ReLU
scores exact ties happen when every head's dot product is <= 0; then recency is the natural prior.
Queries are processed in blocks so the [S, T] score matrix never exists whole.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv4.config import ModelArgs
from dsv4.model.compressor import Compressor
from dsv4.model.fused import Linear, contract, decoding
from dsv4.model.rope import apply_rope

if TYPE_CHECKING:
    from dsv4.model.cache import CompressedState, Step


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
        return _exact_key(scores).topk(k, dim=-1, sorted=False).indices
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    kth = vals.min(-1, keepdim=True).values
    ambiguous = ((scores == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[..., 0])
    if scores.device.type != "meta" and ambiguous.any():
        idx[ambiguous] = _exact_key(scores[ambiguous]).topk(k, dim=-1, sorted=False).indices
    return idx


def _exact_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (score, index): distinct, so top-k on them has no ties and the more recent entry wins."""
    bits = scores.float().view(torch.int32).long()
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotone in the float value
    T = scores.shape[-1]
    return key * T + torch.arange(T, device=scores.device)  # then the higher index wins


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, block_size: int = 1024):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.ratio, self.block_size = args.csa_ratio, block_size
        self.wq_b = Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = Linear(args.dim, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.dim, args.index_head_dim, args.csa_ratio, overlap=True, eps=args.norm_eps)

    def prepare(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Everything the scan needs, computed once: queries q [B, S, H, c], compressed keys [B, T, c] and head
        weights w [B, S, H] (in the compute dtype: the scan is the one superlinear part of the model)."""
        B, S, _ = x.shape
        keys = self.compressor(x, cos, sin)
        q = apply_rope(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), cos[:S, None], sin[:S, None])
        w = self.weights_proj(x) * (self.head_dim * self.n_heads) ** -0.5
        return q, keys, w

    def scores(self, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """I[t, s] for queries q [B, s, H, c] (weights w [B, s, H]) at `positions` ([s], or [B, s] when rows
        differ) against keys [B, T, c]: [B, s, T] fp32, -inf on entries not yet visible to the query."""
        fuse = decoding(q, q.shape[:2].numel())
        scores = contract("bshc,btc->bsht", q, keys, fuse).relu_()
        scores = contract("bsht,bsh->bst", scores, w.to(scores.dtype), fuse).float()
        visible = (positions + 1) // self.ratio
        return scores.masked_fill(torch.arange(keys.shape[1], device=q.device) >= visible[..., None], float("-inf"))

    def select(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-k visible entries per query: [B, s, min(topk, T)], -1 where fewer entries are visible."""
        k = min(self.topk, scores.shape[-1])
        if k == 0:
            return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
        visible = (positions + 1) // self.ratio
        idx = topk_recent_fast(scores, k)
        return torch.where(idx < visible[..., None], idx, -1)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], qr [B, S, q_lora] (normed query latent), cos/sin [S, R/2] (compress rope)
        -> selected entry indices [B, S, min(topk, S // m)], -1 where fewer entries are visible.
        Queries go `block_size` at a time, so the [block, H, T] scores never exist for all S at once."""
        q, keys, w = self.prepare(x, qr, cos, sin)
        S = x.shape[1]
        out = []
        for t0 in range(0, S, self.block_size):
            t1 = min(t0 + self.block_size, S)
            positions = torch.arange(t0, t1, device=x.device)
            out.append(self.select(self.scores(q[:, t0:t1], keys, w[:, t0:t1], positions), positions))
        return torch.cat(out, dim=1)

    def step(self, q: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, state: "CompressedState",
             step: "Step") -> torch.Tensor:
        """Incremental twin of `forward` over a cache, given the step's projections: q = wq_b(qr), the compressor's
        kv = wkv(x) and gate = wgate(x), w = weights_proj(x). Commits the step's compressed keys, then selects for each
        query among the entries it can see. -> [B, width, min(topk, T)]."""
        B, s, _ = q.shape
        self.compressor.step(kv, gate, state, step)
        keys = state.entries[step.slots, : step.end // self.ratio]  # [B, T, c]
        cos, sin = step.rope("csa")
        q = apply_rope(q.view(B, s, self.n_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        w = w * (self.head_dim * self.n_heads) ** -0.5
        return self.select(self.scores(q, keys, w, step.positions), step.positions)


def indexer_kl(scores: torch.Tensor, cmp_probs: torch.Tensor, idx: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(main attention || indexer) over the compressed entries, summed over queries (DeepSeek-V3.2's indexer loss).
    scores [B, s, T] (indexer, fp32, -inf = invisible); cmp_probs [B, s, H, k or T] the main attention's probabilities
    on those entries (detached here); idx [B, s, k] the selected entries (sparse stage) or None (dense warm-up: all
    visible entries). Target = head-summed main probabilities renormalised; rows with no visible entry are skipped.
    Returns (sum of per-query KL, number of queries counted as a tensor: no host sync, no graph break)."""
    target = cmp_probs.detach().float().sum(2)  # [B, s, n]
    if idx is not None:
        logits = scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    else:
        logits = scores
    mass = target.sum(-1, keepdim=True)
    valid = (mass[..., 0] > 0) & torch.isfinite(logits).any(-1)
    target = target / mass.clamp(min=1e-30)
    log_q = torch.log_softmax(logits.masked_fill(~valid[..., None], 0.0), dim=-1)
    terms = torch.xlogy(target, target) - torch.where(target > 0, target * log_q, torch.zeros_like(log_q))
    return (terms.sum(-1) * valid).sum(), valid.sum()
