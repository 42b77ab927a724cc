"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880), as shipped in DeepSeek-V4.

The residual is `n = hc_mult` streams h [B, S, n, D], kept in fp32. Around each sub-layer F (attention or MoE):

    x    = flatten(h) [B, S, nD];  mix = rmsnorm(x) @ fn^T                                 fn: [(2+n)n, nD]
    pre  = sigmoid(mix[:n]   * scale[0] + base[:n]) + hc_eps                              [B, S, n]
    post = 2 sigmoid(mix[n:2n] * scale[1] + base[n:2n])                                   [B, S, n]
    comb = Sinkhorn(softmax(mix[2n:] * scale[2] + base[2n:]) + hc_eps)                    [B, S, n, n] doubly stochastic
    h'_k = post_k * F(sum_j pre_j h_j) + sum_j comb[j, k] h_j          (comb is applied TRANSPOSED)

`HyperHead` collapses the streams once at the end: w = sigmoid(mix * scale + base) + eps, out = sum_j w_j h_j.
All hyper-connection parameters and math stay in fp32. The [B, S, n, D] tensors are the largest activations of a
small model, so each step below writes at most one of them.
"""

import torch
from torch import nn

from dsv4.kernels.fused import contract, decoding, linear


def _mix(h: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, S, n, D] fp32 -> [B, S, rows of fn]: rmsnorm(flatten(h)) @ fn^T."""
    x = h.flatten(-2)
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return linear(x, fn) * torch.rsqrt(rms.square() + eps)


def _collapse(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_j w_j h_j:  w [B, S, n], h [B, S, n, D] -> [B, S, D]"""
    if decoding(h, h.shape[:2].numel()):  # compiled for a decode step: one fused loop (see dsv4.kernels.fused)
        return contract("bsn,bsnd->bsd", w, h, fuse=True)
    return (w.unsqueeze(-2) @ h).squeeze(-2)


class HyperConnection(nn.Module):
    def __init__(self, dim: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        rows = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(rows, hc_mult * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(rows, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02):
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, S, n, D] fp32 -> (sub-layer input [B, S, D], post [B, S, n], comb [B, S, n, n]), all fp32."""
        n = self.n
        mix = _mix(h, self.fn, self.norm_eps)
        pre = torch.sigmoid(mix[..., :n] * self.scale[0] + self.base[:n]) + self.hc_eps
        post = 2 * torch.sigmoid(mix[..., n:2 * n] * self.scale[1] + self.base[n:2 * n])
        logits = mix[..., 2 * n:] * self.scale[2] + self.base[2 * n:]
        comb = torch.softmax(logits.unflatten(-1, (n, n)), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.hc_eps)  # Sinkhorn: columns, then (rows, columns) x iters-1
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.hc_eps)
        return _collapse(pre, h), post, comb

    def post(self, y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Write the sub-layer output back into the streams (see `hc_post`); a method so it can be compiled."""
        return hc_post(y, h, post, comb)


def hc_post(y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New fp32 streams: post_k * y + sum_j comb[j, k] h_j.   y [B, S, D], h [B, S, n, D] -> [B, S, n, D]."""
    if decoding(h, h.shape[:2].numel()):
        out = contract("bsjk,bsjd->bskd", comb, h, fuse=True)
    else:
        out = comb.transpose(-1, -2) @ h
    return out.addcmul_(post.unsqueeze(-1), y.float().unsqueeze(-2))


class HyperHead(nn.Module):
    def __init__(self, dim: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(hc_mult, hc_mult * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02):
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, n, D] fp32 -> [B, S, D] fp32"""
        w = torch.sigmoid(_mix(h, self.fn, self.norm_eps) * self.scale + self.base) + self.hc_eps
        return _collapse(w, h)
