"""Partial, interleaved rotary embedding on the trailing `rope_head_dim` dims of a head.

Two tables per model: sliding-window-only layers use plain RoPE at `rope_theta`; compressed (CSA/HCA) layers, their
compressors and the lightning indexer use `compress_rope_theta` with YaRN (Peng et al. 2023, arXiv 2309.00071) and no
attention scaling. Pairs are interleaved: (x[2i], x[2i+1]) rotate together, as in DeepSeek's release.
Because V4's value is its key, the attention output is rotated back by the query position (`inverse=True`).
"""

import math

import torch
from torch import nn

from dsv4.config import ModelArgs


def rope_inv_freq(args: ModelArgs, theta: float, yarn: bool) -> torch.Tensor:
    """[rope_head_dim/2] inverse frequencies; YaRN-corrected when `yarn` and rope_factor > 1."""
    dim = args.rope_head_dim
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not yarn or args.rope_factor <= 1:
        return freqs

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in the context
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency dims keep their frequency; ramp 1: low-frequency dims are interpolated by the factor
    return freqs / args.rope_factor * ramp + freqs * (1 - ramp)


class Rotary(nn.Module):
    """Holds one inverse-frequency table; `forward(positions)` gives fp32 (cos, sin) of shape [*positions, R/2]."""

    def __init__(self, args: ModelArgs, theta: float, yarn: bool):
        super().__init__()
        self.args, self.theta, self.yarn = args, theta, yarn
        self.register_buffer("inv_freq", rope_inv_freq(args, theta, yarn), persistent=False)

    def reset_parameters(self, std: float = 0.0):
        self.inv_freq.copy_(rope_inv_freq(self.args, self.theta, self.yarn))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x [..., D] in interleaved pairs; cos/sin broadcast to [..., R/2]."""
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    x0, x1 = rope.unflatten(-1, (-1, 2)).unbind(-1)  # [..., R/2] each
    if inverse:
        sin = -sin
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
