"""Finite scalar quantisation (FSQ; Mentzer et al. 2023, arXiv 2309.15505): the pixel tokenizers' codebook.

Each of d channels is squashed into a bounded range and rounded to one of L_i levels, so the codebook is the grid
L_1 x ... x L_d (e.g. levels (8, 5, 5, 5): 1,000 codes), fixed, with nothing to learn and nothing to collapse:

    bound(z)_i = tanh(z_i + shift_i) * h_i - offset_i     h_i = (L_i - 1)(1 + eps) / 2; offset_i = 1/2 for even
                                                           L_i, else 0 (so that rounding yields exactly L_i
                                                           integers); shift_i = atanh(offset_i / h_i)
    q_i = round(bound(z)_i) / (L_i // 2)                   in [-1, 1]; the gradient passes the rounding straight
                                                           through (d q / d z = d bound / d z / (L_i // 2))
    index = sum_i (q_i (L_i // 2) + L_i // 2) * prod_{j < i} L_j          a code's id in [0, prod L)

The grid points are what the decoder sees; the index is the visual token the language model reads and writes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-3


class FSQ(nn.Module):
    """Quantises the last dimension of its input (d = len(levels) channels) onto the FSQ grid."""

    def __init__(self, levels: tuple[int, ...] | list[int]):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels are >= 2 per channel, got {levels}")
        self.levels = tuple(int(n) for n in levels)
        L = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", L, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1, *self.levels[:-1]]), 0), persistent=False)
        self.register_buffer("_half_width", (L // 2), persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Each channel squashed into (-L/2, L/2) around the integers it rounds to (see the module docstring)."""
        half = (self._levels - 1) * (1 + EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> the grid point in [-1, 1] [..., d]; rounding's gradient passes straight through."""
        b = self.bound(z.float())
        q = b + (b.round() - b).detach()
        return (q / self._half_width).to(z.dtype)

    def codes_to_indices(self, q: torch.Tensor) -> torch.Tensor:
        """Grid points [..., d] -> code ids [...] (int64)."""
        digits = (q.float() * self._half_width + self._half_width).round().long()
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """Code ids [...] -> grid points [..., d] (fp32)."""
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"FSQ code ids lie in [0, {self.codebook_size}), got {int(idx.min())}..{int(idx.max())}")
        digits = (idx[..., None] // self._basis) % self._levels.long()
        return (digits.float() - self._half_width) / self._half_width
