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

import torch
from torch import nn

from dsv4.config import ModelArgs
from dsv4.model.compressor import Compressor
from dsv4.model.rope import apply_rope


def topk_recent(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the higher index (plain twin, sorts all)."""
    T = scores.shape[-1]
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return T - 1 - order


def topk_recent_fast(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same set as `topk_recent` (order not guaranteed): torch.topk, then the rare rows whose k-th value is tied
    with an unselected entry are redone with an exact (score, index) key. -inf ties are left alone: the caller
    drops entries that are not visible."""
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    kth = vals.min(-1, keepdim=True).values
    ambiguous = ((scores == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[..., 0])
    if scores.device.type != "meta" and ambiguous.any():
        rows = scores[ambiguous].float()
        bits = rows.view(torch.int32).long()
        key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotone in the float value
        T = rows.shape[-1]
        key = key * T + torch.arange(T, device=rows.device)  # then the higher index wins
        idx[ambiguous] = key.topk(k, dim=-1, sorted=False).indices
    return idx


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, block_size: int = 1024):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.ratio, self.block_size = args.csa_ratio, block_size
        self.wq_b = nn.Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(args.dim, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.dim, args.index_head_dim, args.csa_ratio, overlap=True, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], qr [B, S, q_lora] (normed query latent), cos/sin [S, R/2] (compress rope)
        -> selected entry indices [B, S, min(topk, S // m)], -1 where fewer entries are visible."""
        B, S, _ = x.shape
        keys = self.compressor(x, cos, sin)  # [B, T, c] in the compute dtype: the scan is the one superlinear part
        T = keys.shape[1]
        k = min(self.topk, T)
        if k == 0:
            return torch.empty(B, S, 0, dtype=torch.long, device=x.device)
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:S, None], sin[:S, None])  # [B, S, H, c]
        w = self.weights_proj(x) * (self.head_dim * self.n_heads) ** -0.5  # [B, S, H]
        visible = (torch.arange(S, device=x.device) + 1) // self.ratio  # [S] entries each query may see
        out = []
        for t0 in range(0, S, self.block_size):  # blocks of queries bound the [block, H, T] scores
            t1 = min(t0 + self.block_size, S)
            scores = torch.einsum("bshc,btc->bsht", q[:, t0:t1], keys).relu_()
            scores = torch.einsum("bsht,bsh->bst", scores, w[:, t0:t1].to(scores.dtype)).float()
            future = torch.arange(T, device=x.device) >= visible[t0:t1, None]  # [s, T]
            scores = scores.masked_fill(future, float("-inf"))
            idx = topk_recent_fast(scores, k)
            out.append(torch.where(idx < visible[t0:t1, None], idx, -1))
        return torch.cat(out, dim=1)
