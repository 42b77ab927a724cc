"""KV compressor of DeepSeek-V4's compressed attention: m consecutive tokens -> one entry.

    kv_j = wkv(x_j),  z_j = wgate(x_j) + ape[j mod m]                  (fp32)
    HCA (no overlap, width d):      C_i = sum_{j in window i} softmax_j(z_j) * kv_j          (softmax per channel)
    CSA (overlap, width 2d):        window i uses 2m slots: the first-half channels [:d] of window i-1
                                    and the second-half channels [d:] of window i; window 0's borrowed slots
                                    are empty (gate -inf)
    then weighted RMSNorm and RoPE (compress theta + YaRN) at position i*m.
Query t may read entry i only once its window is closed: i < (t+1) // m.
`step` is the incremental twin: it continues from the rows a cache keeps and closes the windows a step completes.
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels.fused import Linear
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import apply_rope

if TYPE_CHECKING:
    from dsv4.model.cache import CompressedState, Step


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = Linear(dim, width, bias=False)
        self.wgate = Linear(dim, width, bias=False)
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
        kv = self.wkv(x).float().view(B, n, m, width)  # [B, n, m, width]
        gate = self.wgate(x).float().view(B, n, m, width) + self.ape
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

    def step(self, kv_new: torch.Tensor, gate_new: torch.Tensor, state: "CompressedState", step: "Step"):
        """Continue the compression by `step`'s positions, given their projections wkv(x), wgate(x) [B, width, w].
        Commits the rows and every window the committed positions close into `state` (entries are read from there)."""
        B, s, _ = kv_new.shape
        m, d = self.ratio, self.head_dim
        R, width = state.kv.shape[1], self.ape.shape[-1]
        kv_new, gate_new = kv_new.float(), gate_new.float()
        device = kv_new.device
        # rows of positions start-R .. start+s-1: enough for the window holding `start` (and the one before)
        src_kv = torch.cat([step.read_ring(state.kv), kv_new], dim=1)
        src_gate = torch.cat([step.read_ring(state.gate), gate_new], dim=1)
        step.write_ring(state.kv, kv_new)
        step.write_ring(state.gate, gate_new)

        ov = 1 if self.overlap else 0
        K = (m - 1 + s) // m  # the most windows one step can close
        first = step.start // m  # the first window that can close (the one holding `start`)
        # positions (first - ov) * m + r sit at src index m - start % m + r (beyond the source: never closes)
        at = ((m - step.start % m)[:, None] + torch.arange((K + ov) * m, device=device)).clamp(max=R + s - 1)
        at = at[..., None].expand(-1, -1, width)
        kv = src_kv.gather(1, at).view(B, K + ov, m, width)
        gate = src_gate.gather(1, at).view(B, K + ov, m, width) + self.ape
        if self.overlap:  # window first-1 lends its first-half channels; before position 0 it is empty
            prev_gate = gate[:, :-1, :, :d]
            before_start = (first[:, None] + torch.arange(K, device=device) - 1) < 0  # [B, K]
            prev_gate = prev_gate.masked_fill(before_start[:, :, None, None], float("-inf"))
            kv = torch.cat([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], dim=2)  # [B, K, 2m, d]
            gate = torch.cat([prev_gate, gate[:, 1:, :, d:]], dim=2)
        entries = self.norm((kv * gate.softmax(dim=2)).sum(dim=2))  # [B, K, d]
        cos, sin = step.rotary["csa"]((first[:, None] + torch.arange(K, device=device)) * m)
        step.write_entries(state.entries, apply_rope(entries, cos, sin), first, m)
