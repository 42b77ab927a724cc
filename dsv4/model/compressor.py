"""KV compressor of DeepSeek-V4's compressed attention: m consecutive tokens -> one entry.

    kv_j = wkv(x_j),  z_j = wgate(x_j) + ape[j mod m]                  (fp32)
    HCA (no overlap, width d):      C_i = sum_{j in window i} softmax_j(z_j) * kv_j          (softmax per channel)
    CSA (overlap, width 2d):        window i uses 2m slots: the first-half channels [:d] of window i-1
                                    and the second-half channels [d:] of window i; window 0's borrowed slots
                                    are empty (gate -inf)
    then weighted RMSNorm and RoPE (compress theta + YaRN) at position i*m.
Query t may read entry i only once its window is closed: i < (t+1) // m.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.norm import RMSNorm
from dsv4.model.rope import apply_rope


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))  # absolute position in the window
        self.norm = RMSNorm(head_dim, eps)

    def reset_parameters(self, std: float = 0.0):
        nn.init.zeros_(self.ape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D]; cos/sin [>=S, R/2] by absolute position (sequence starts at 0) -> entries [B, S // m, d]."""
        B, S, _ = x.shape
        m, d = self.ratio, self.head_dim
        n = S // m
        if n == 0:
            return x.new_zeros(B, 0, d)
        x = x[:, : n * m]
        width = self.ape.shape[-1]
        kv = F.linear(x, self.wkv.weight).float().view(B, n, m, width)  # [B, n, m, width]
        gate = F.linear(x, self.wgate.weight).float().view(B, n, m, width) + self.ape
        if self.overlap:
            # previous window's first-half channels (window -1 is empty) next to this window's second half
            prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)  # [B, n, 2m, d]
            gate = torch.cat([prev_gate, gate[..., d:]], dim=2)
        entries = (kv * gate.softmax(dim=2)).sum(dim=2)  # [B, n, d]
        entries = self.norm(entries)
        pos = torch.arange(n, device=x.device) * m
        return apply_rope(entries, cos[pos], sin[pos]).to(x.dtype)
