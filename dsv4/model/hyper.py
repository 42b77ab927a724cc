"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880), as shipped in DeepSeek-V4.

The residual is `n = hc_mult` streams h [B, S, n, D], kept in fp32. Around each sub-layer F (attention or MoE):

    x    = flatten(h) [B, S, nD];  mix = rmsnorm(x) @ fn^T                                 fn: [(2+n)n, nD]
    pre  = sigmoid(mix[:n]   * scale[0] + base[:n]) + hc_eps                              [B, S, n]
    post = 2 sigmoid(mix[n:2n] * scale[1] + base[n:2n])                                   [B, S, n]
    comb = Sinkhorn(softmax(mix[2n:] * scale[2] + base[2n:]) + hc_eps)                    [B, S, n, n] doubly stochastic
    h'_k = post_k * F(sum_j pre_j h_j) + sum_j comb[j, k] h_j          (comb is applied TRANSPOSED)

`HyperHead` collapses the streams once at the end: w = sigmoid(mix * scale + base) + eps, out = sum_j w_j h_j.
All hyper-connection parameters and math stay in fp32. The [B, S, n, D] tensors are the largest activations of a
small model, so each step below writes at most one of them. The products (`mix`, the collapse sum_j w_j h_j, the
stream mix comb^T h) go through the module's product set `ops` (dsv4.kernels.fused).
"""

import torch
from torch import nn

from dsv4.kernels.fused import Products
from dsv4.kernels.sinkhorn import sinkhorn as fast_sinkhorn


def _mix(h: torch.Tensor, fn: torch.Tensor, eps: float, ops: type[Products]) -> torch.Tensor:
    """[B, S, n, D] fp32 -> [B, S, rows of fn]: rmsnorm(flatten(h)) @ fn^T."""
    x = h.flatten(-2)
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return ops.linear(x, fn) * torch.rsqrt(rms.square() + eps)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] -> (nearly) doubly stochastic: columns, then (rows, columns) x (iters - 1), each sum + eps. The
    reference loop, and what torch.compile fuses; eager, the model runs `dsv4.kernels.sinkhorn.sinkhorn`, the same
    steps with a faster backward."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def _collapse(w: torch.Tensor, h: torch.Tensor, ops: type[Products]) -> torch.Tensor:
    """sum_j w_j h_j:  w [B, S, n], h [B, S, n, D] -> [B, S, D]"""
    return ops.matmul(w.unsqueeze(-2), h).squeeze(-2)


class HyperConnection(nn.Module):
    ops = Products  # the product set (dsv4.kernels.fused)
    hot_paths = ("forward", "post")  # what dsv4.kernels.compile.compile_hot_paths compiles

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
        mix = _mix(h, self.fn, self.norm_eps, self.ops)
        pre = torch.sigmoid(mix[..., :n] * self.scale[0] + self.base[:n]) + self.hc_eps
        post = 2 * torch.sigmoid(mix[..., n:2 * n] * self.scale[1] + self.base[n:2 * n])
        logits = mix[..., 2 * n:] * self.scale[2] + self.base[2 * n:]
        comb = torch.softmax(logits.unflatten(-1, (n, n)), dim=-1) + self.hc_eps
        # compiled, inductor fuses the plain loop (forward and backward) into a few kernels; eager, the kernel twin
        comb = (sinkhorn if torch.compiler.is_compiling() else fast_sinkhorn)(comb, self.iters, self.hc_eps)
        return _collapse(pre, h, self.ops), post, comb

    def post(self, y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Write the sub-layer output back into the streams (see `hc_post`); a method so it can be compiled."""
        if self.ops is Products:  # `hc_post` as the reference writes it (tests swap it: parity must catch comb^T)
            return hc_post(y, h, post, comb)
        return hc_post(y, h, post, comb, self.ops)


def hc_post(y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            ops: type[Products] = Products) -> torch.Tensor:
    """New fp32 streams: post_k * y + sum_j comb[j, k] h_j.   y [B, S, D], h [B, S, n, D] -> [B, S, n, D]."""
    return ops.matmul(comb.transpose(-1, -2), h).addcmul_(post.unsqueeze(-1), y.float().unsqueeze(-2))


class HyperHead(nn.Module):
    ops = Products  # the product set (dsv4.kernels.fused)

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
        w = torch.sigmoid(_mix(h, self.fn, self.norm_eps, self.ops) * self.scale + self.base) + self.hc_eps
        return _collapse(w, h, self.ops)
