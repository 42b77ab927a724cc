"""DeepSeek-V4 attention: shared-KV multi-query attention over a sliding window plus compressed entries.

    qr = rmsnorm(wq_a x)                  q = rmsnorm_noweight(wq_b qr).view(H, d), RoPE on the trailing dims
    kv = rmsnorm(wkv x)                   one d-dim head that is both key and value, RoPE on the trailing dims
    keys(t) = kv[t-W+1 .. t]  (sliding window, self included)
            + compressed entries: HCA all closed windows i < (t+1)//m; CSA the indexer's top-k of those
    o_t = sum_s softmax_s(q_t . k_s / sqrt(d) ; sink_h) v_s      (the per-head sink logit only adds to the denominator)
    o_t = RoPE^-1(o_t) at t                                         (values carry RoPE; rotate back)
    out = wo_b( concat_g wo_a_g(o_t[heads of group g]) )            (grouped low-rank output projection)

Sliding-window-only layers use RoPE theta `rope_theta`; compressed layers use `compress_rope_theta` with YaRN.
The window is computed block by block ([S/W, W, 2W] scores, never [S, S]); CSA gathers only its top-k entries.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelArgs
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.norm import RMSNorm, rms_norm
from dsv4.model.rope import apply_rope


def window_scores(q: torch.Tensor, kv: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled-free logits of every query against its sliding window, block by block.
    q [B, S, H, d], kv [B, S, d] -> (logits [B, S, H, 2W], keys [B, S/W, 2W, d]); masked slots are -inf.
    Block j of W queries sees keys from positions jW-W .. jW+W-1; query i of the block may read key slot k
    iff i < k <= i + W (inside the window and causal) and the key position is >= 0."""
    B, S, H, d = q.shape
    W = window
    nb = -(-S // W)
    pad = nb * W - S
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, d)
    keys = F.pad(kv, (0, 0, W, pad)).unfold(1, 2 * W, W).transpose(-1, -2)  # [B, nb, 2W, d]
    logits = torch.einsum("bnwhd,bnkd->bnwhk", qb, keys)
    i = torch.arange(W, device=q.device)[:, None]
    k = torch.arange(2 * W, device=q.device)[None, :]
    allowed = (k > i) & (k <= i + W)  # [W, 2W]
    first = allowed & (k >= W)  # block 0 has no previous block
    mask = torch.stack([first] + [allowed] * (nb - 1)) if nb > 1 else first[None]  # [nb, W, 2W]
    logits = logits.masked_fill(~mask[None, :, :, None, :], float("-inf"))
    return logits.reshape(B, nb * W, H, 2 * W)[:, :S], keys


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.window = args.n_heads, args.head_dim, args.window_size
        self.o_groups, self.o_lora_rank = args.o_groups, args.o_lora_rank
        self.ratio = args.compress_ratios[layer_id]
        self.kind = args.layer_kind(layer_id)
        self.softmax_scale = args.head_dim ** -0.5
        eps = args.norm_eps
        self.norm_eps = eps
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, eps)
        self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * args.head_dim, bias=False)
        self.wkv = nn.Linear(args.dim, args.head_dim, bias=False)
        self.kv_norm = RMSNorm(args.head_dim, eps)
        # block-diagonal: group g maps its heads' (H/G)*d outputs to o_lora_rank
        self.wo_a = nn.Linear(args.n_heads * args.head_dim // args.o_groups, args.o_groups * args.o_lora_rank,
                              bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(args.n_heads, dtype=torch.float32))
        self.compressor = (Compressor(args.dim, args.head_dim, self.ratio, overlap=self.kind == "csa", eps=eps)
                           if self.ratio else None)
        self.indexer = Indexer(args) if self.kind == "csa" else None

    def reset_parameters(self, std: float = 0.0):
        nn.init.zeros_(self.attn_sink)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, S, D] at positions 0..S-1; rope = this layer's (cos, sin) [S, R/2]."""
        B, S, _ = x.shape
        cos, sin = rope
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), self.norm_eps)
        q = apply_rope(q, cos[:S, None], sin[:S, None])  # [B, S, H, d]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos[:S], sin[:S])  # [B, S, d]

        logits, win_keys = window_scores(q, kv, self.window)  # [B, S, H, 2W]
        parts = [logits]
        if self.compressor is not None:
            entries = self.compressor(x, cos, sin)  # [B, T, d]
            T = entries.shape[1]
            visible = (torch.arange(S, device=x.device) + 1) // self.ratio  # [S]
            if self.indexer is not None:  # CSA: gather each query's top-k entries
                idx = self.indexer(x, qr, cos, sin)  # [B, S, k], -1 = empty
                cmp_keys = entries[torch.arange(B, device=x.device)[:, None, None], idx.clamp(min=0)]  # [B, S, k, d]
                cmp_logits = torch.einsum("bshd,bskd->bshk", q, cmp_keys)
                cmp_logits = cmp_logits.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
            else:  # HCA: every closed window
                cmp_keys = entries
                cmp_logits = torch.einsum("bshd,btd->bsht", q, entries)
                future = torch.arange(T, device=x.device) >= visible[:, None]  # [S, T]
                cmp_logits = cmp_logits.masked_fill(future[None, :, None, :], float("-inf"))
            parts.append(cmp_logits)
        sink = self.attn_sink.view(1, 1, -1, 1).expand(B, S, -1, 1)
        all_logits = torch.cat([p.float() * self.softmax_scale for p in parts] + [sink.float()], dim=-1)
        probs = all_logits.softmax(-1).to(q.dtype)

        # weighted values: window part block by block, compressed part gathered/dense
        W = self.window
        nb = win_keys.shape[1]
        p_win = F.pad(probs[..., : 2 * W], (0, 0, 0, 0, 0, nb * W - S)).view(B, nb, W, self.n_heads, 2 * W)
        o = torch.einsum("bnwhk,bnkd->bnwhd", p_win, win_keys).reshape(B, nb * W, self.n_heads, -1)[:, :S]
        if self.compressor is not None:
            p_cmp = probs[..., 2 * W: -1]
            eq = "bshk,bskd->bshd" if self.indexer is not None else "bsht,btd->bshd"
            o = o + torch.einsum(eq, p_cmp, cmp_keys)
        o = apply_rope(o, cos[:S, None], sin[:S, None], inverse=True)  # [B, S, H, d]
        return self.project_out(o)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """[B, S, H, d] -> [B, S, D] through the grouped low-rank projection."""
        B, S = o.shape[:2]
        G = self.o_groups
        o = o.reshape(B, S, G, -1)
        wo_a = self.wo_a.weight.view(G, self.o_lora_rank, -1)  # [G, R, (H/G) d]
        o = torch.einsum("bsgi,gri->bsgr", o, wo_a)
        return self.wo_b(o.flatten(2))
