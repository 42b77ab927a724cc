"""RMSNorm, weighted (fp32 weight) and unweighted. Statistics in fp32, result in the input dtype."""

import torch
from torch import nn


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm: the per-head query norm and the normaliser inside mHC."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Over the last dim; `dim` may be a shape (n, D): one weight per hyper-connection stream (Engram's norms)."""

    def __init__(self, dim: int | tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))  # kept in fp32 like the release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)

    def reset_parameters(self, std: float = 0.0):
        nn.init.ones_(self.weight)
