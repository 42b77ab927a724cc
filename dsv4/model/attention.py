"""DeepSeek-V4 attention: shared-KV multi-query attention over a sliding window plus compressed entries.

    qr = rmsnorm(wq_a x)                  q = rmsnorm_noweight(wq_b qr).view(H, d), RoPE on the trailing dims
    kv = rmsnorm(wkv x)                   one d-dim head that is both key and value, RoPE on the trailing dims
    keys(t) = kv[t-W+1 .. t]  (sliding window, self included)
            + compressed entries: HCA all closed windows i < (t+1)//m; CSA the indexer's top-k of those
    o_t = sum_s softmax_s(q_t . k_s / sqrt(d) ; sink_h) v_s      (the per-head sink logit only adds to the denominator)
    o_t = RoPE^-1(o_t) at t                                         (values carry RoPE; rotate back)
    out = wo_b( concat_g wo_a_g(o_t[heads of group g]) )            (grouped low-rank output projection)

Sliding-window-only layers use RoPE theta `rope_theta`; compressed layers use `compress_rope_theta` with YaRN.
Queries are processed in blocks; the window W queries at a time ([W, 2W] scores, never [S, S]); CSA gathers
only its top-k entries (or, while there are few entries, scores them all and masks the unselected: the same
soft-max with dense matmuls). A long prefill chunk goes through `attend_blocks`, which bounds the scores one query
block holds (HCA reads every compressed entry) and lets CSA gather its top-k from the cache in place.
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelArgs
from dsv4.kernels.fused import Linear, LinearGroup, Products
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer, indexer_kl
from dsv4.model.norm import RMSNorm, rms_norm
from dsv4.model.rope import apply_rope
from dsv4.model.stats import LayerStats

if TYPE_CHECKING:
    from dsv4.model.cache import LayerCache, Step


def window_scores(q: torch.Tensor, keys: torch.Tensor, window: int, start: int | torch.Tensor = 0,
                  ops: type[Products] = Products) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of queries at positions start.. against their sliding windows, W queries at a time.
    q [B, s, H, d]; keys [B, W + s, d] the keys of positions start-W .. start+s-1 (those below 0 are masked);
    start an int or a [B] tensor (rows at different positions) -> (logits [B, s, H, 2W], keys [B, nb, 2W, d]),
    masked slots -inf. Query block j (queries jW .. jW+W-1) reads the key slots jW .. jW+2W-1; its query i may
    read slot k iff i < k <= i + W (inside the window, causal) and the key's position is >= 0.
    With s <= W (decoding) there is one block of s queries reading all W + s keys: [B, s, H, W+s], [B, 1, W+s, d].
    ops: the product set for these queries (dsv4.kernels.fused)."""
    B, s, H, d = q.shape
    W = window
    if s <= W:  # one block of the s queries against all W + s keys (a decode step: no padding to W queries)
        nb, rows, width = 1, s, W + s
        qb, keys = q[:, None], keys[:, None]
    else:
        nb, rows, width = -(-s // W), W, 2 * W
        qb = F.pad(q, (0, 0, 0, 0, 0, nb * W - s)).view(B, nb, W, H, d)
        blocks = F.pad(keys, (0, 0, 0, (nb + 1) * W - keys.shape[1])).view(B, nb + 1, W, -1)
        # block j's keys = key blocks j and j+1 (a copy, not an overlapping unfold view: compiled backward
        # mis-sums those)
        keys = torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)
    logits = ops.contract("bnwhd,bnkd->bnwhk", qb, keys)
    i = torch.arange(rows, device=q.device)[:, None]
    k = torch.arange(width, device=q.device)[None, :]
    mask = (k > i) & (k <= i + W)  # [rows, width]
    key_pos = torch.arange(nb, device=q.device)[:, None] * W + k - W  # [nb, width], relative to start
    if isinstance(start, torch.Tensor):  # [B, nb, W, 2W]
        mask = mask & (key_pos[None, :, None, :] + start[:, None, None, None] >= 0)
    elif start < W:
        mask = (mask & (key_pos[:, None, :] + start >= 0))[None]
    else:
        mask = mask[None, None]
    logits = logits.masked_fill_(~mask[..., None, :], float("-inf"))
    return logits.reshape(B, nb * rows, H, width)[:, :s], keys


def window_keys(kv: torch.Tensor, t0: int, t1: int, window: int) -> torch.Tensor:
    """The keys `window_scores` needs for queries t0..t1-1 of a whole sequence kv [B, S, d]: [B, W + t1 - t0, d]."""
    lo = t0 - window
    return F.pad(kv[:, max(lo, 0): t1], (0, 0, max(-lo, 0), 0))


class Attention(nn.Module):
    ops = Products  # the product set (dsv4.kernels.fused)
    hot_paths = ("attend",)  # what dsv4.kernels.compile.compile_hot_paths compiles
    # CSA scores every compressed entry and masks the unselected ones when there are at most this many times top-k
    # entries: a few dense matmuls beat a per-query gather of k keys (and its scatter in the backward) until then
    DENSE_SELECT = 8

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.window = args.n_heads, args.head_dim, args.window_size
        self.o_groups, self.o_lora_rank = args.o_groups, args.o_lora_rank
        self.ratio = args.compress_ratios[layer_id]
        self.kind = args.layer_kind(layer_id)
        self.softmax_scale = args.head_dim ** -0.5
        eps = args.norm_eps
        self.norm_eps = eps
        self.wq_a = Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, eps)
        self.wq_b = Linear(args.q_lora_rank, args.n_heads * args.head_dim, bias=False)
        self.wkv = Linear(args.dim, args.head_dim, bias=False)
        self.kv_norm = RMSNorm(args.head_dim, eps)
        # block-diagonal: group g maps its heads' (H/G)*d outputs to o_lora_rank
        self.wo_a = Linear(args.n_heads * args.head_dim // args.o_groups, args.o_groups * args.o_lora_rank,
                           bias=False)
        self.wo_b = Linear(args.o_groups * args.o_lora_rank, args.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(args.n_heads, dtype=torch.float32))
        self.compressor = (Compressor(args.dim, args.head_dim, self.ratio, overlap=self.kind == "csa", eps=eps)
                           if self.ratio else None)
        self.indexer = Indexer(args) if self.kind == "csa" else None
        # what the incremental step runs as one product each (see dsv4.kernels.fused): the projections of x, of qr
        inputs = [self.wq_a, self.wkv]
        if self.compressor is not None:
            inputs += [self.compressor.wkv, self.compressor.wgate]
        if self.indexer is not None:
            inputs += [self.indexer.compressor.wkv, self.indexer.compressor.wgate, self.indexer.weights_proj]
        self.x_group = LinearGroup(*inputs)
        self.qr_group = LinearGroup(self.wq_b, *([self.indexer.wq_b] if self.indexer is not None else []))

    def reset_parameters(self, std: float = 0.0):
        nn.init.zeros_(self.attn_sink)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], stats: LayerStats | None = None,
                block: int = 1024) -> torch.Tensor:
        """x [B, S, D] at positions 0..S-1; rope = this layer's (cos, sin) [S, R/2]. Queries are attended
        `block` at a time (rounded to whole windows), so no attention temporary grows with S beyond [block, ...].
        stats: in training, the indexer's stage (see dsv4.model.stats.TrainStats); CSA layers report its KL there."""
        B, S, _ = x.shape
        cos, sin = rope
        # the indexer's training stage; read only where there is an indexer (a compiled block guards on what it reads)
        stage = stats.indexer if stats is not None and self.indexer is not None else None
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), self.norm_eps)
        q = apply_rope(q, cos[:S, None], sin[:S, None]) * self.softmax_scale  # [B, S, H, d], pre-scaled
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos[:S], sin[:S])  # [B, S, d]
        entries = self.compressor(x, cos, sin) if self.compressor is not None else None  # [B, T, d]
        prepared = None
        if self.indexer is not None:  # in training the indexer learns from its own KL loss only: detach its input
            xi, qri = (x.detach(), qr.detach()) if stage else (x, qr)
            prepared = self.indexer.prepare(xi, qri, cos, sin)

        block = max(block // self.window, 1) * self.window
        outputs, kl_sum, kl_count = [], x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.long)
        for t0 in range(0, S, block):
            t1 = min(t0 + block, S)
            scores, idx = self.select_entries(prepared, t0, t1, stage) if prepared is not None else (None, None)
            o, cmp_probs = self.attend(q[:, t0:t1], window_keys(kv, t0, t1, self.window), entries, idx, t0)
            if stage and scores is not None:
                kl, n = indexer_kl(scores, cmp_probs, idx)
                kl_sum, kl_count = kl_sum + kl, kl_count + n
            outputs.append(o)
        if stage and prepared is not None:
            stats.indexer_kl = kl_sum / kl_count.clamp(min=1)
        o = apply_rope(torch.cat(outputs, dim=1), cos[:S, None], sin[:S, None], inverse=True)  # [B, S, H, d]
        return self.project_out(o)

    def select_entries(self, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], t0: int, t1: int,
                       stage: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The lightning indexer's part for queries t0..t1-1, given `Indexer.prepare`'s (q, keys, w) -> (its scores
        [B, s, T] fp32, or None from the long-context scan; the selected entries [B, s, k], or None in the dense
        warm-up, which reads every visible entry)."""
        q, keys, w = prepared
        positions = torch.arange(t0, t1, device=q.device)
        if not stage and self.indexer.long(q[:, t0:t1], keys.shape[1]):
            return None, self.indexer.scan(q[:, t0:t1], w[:, t0:t1], positions, lambda j0, j1: keys[:, j0:j1],
                                           keys.shape[1])
        scores = self.indexer.scores(q[:, t0:t1], keys, w[:, t0:t1], positions)  # [B, s, T]
        return scores, None if stage == "dense" else self.indexer.select(scores.detach(), positions)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, entries: torch.Tensor | None, idx: torch.Tensor | None,
               start: int | torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the (scaled) queries at positions start..start+s-1 (start an int, or [B] per row) ->
        (output [B, s, H, d], the attention probabilities on the compressed entries [B, s, H, k or T] or None).
        keys: the window keys of positions start-W .. start+s-1 (see `window_scores`); entries [B, T, d], or with
        `rows` [B] a cache buffer [N, max entries, d] whose row rows[b] holds batch row b's entries (CSA then gathers
        its top-k from there, copying nothing else); idx: each query's selected entries (CSA), or None to read every
        visible entry (HCA, CSA's dense warm-up)."""
        B, s, H, _ = q.shape
        W = self.window
        ops = self.ops.for_rows(B * s)  # the products for this many query rows (dsv4.kernels.fused)
        logits, win_keys = window_scores(q, keys, W, start, ops)  # [B, s, H, 2W]
        parts = [logits]
        if entries is not None:
            T = entries.shape[1]
            dense = idx is not None and rows is None and T <= self.DENSE_SELECT * idx.shape[-1]
            if idx is not None and not dense:  # CSA: gather each query's top-k entries
                base = rows if rows is not None else torch.arange(B, device=q.device)
                flat = (idx.clamp(min=0) + T * base[:, None, None]).flatten()
                cmp_keys = entries.flatten(0, 1).index_select(0, flat).view(*idx.shape, entries.shape[-1])
                cmp_logits = ops.contract("bshd,bskd->bshk", q, cmp_keys)
                cmp_logits = cmp_logits.masked_fill_((idx < 0)[:, :, None, :], float("-inf"))
            elif dense:  # CSA with few entries: score them all, keep the selected (same soft-max, no gather)
                cmp_keys = entries
                cmp_logits = ops.contract("bshd,btd->bsht", q, entries)
                chosen = torch.zeros(B, s, T + 1, dtype=torch.bool, device=q.device)
                chosen = chosen.scatter_(-1, torch.where(idx < 0, T, idx), True)[..., :T]  # -1 -> a dropped slot
                cmp_logits = cmp_logits.masked_fill_(~chosen[:, :, None, :], float("-inf"))
            else:  # HCA: every closed window
                cmp_keys = entries
                cmp_logits = ops.contract("bshd,btd->bsht", q, entries)
                if isinstance(start, torch.Tensor):
                    positions = start[:, None] + torch.arange(s, device=q.device)  # [B, s]
                else:
                    positions = torch.arange(start, start + s, device=q.device)  # [s]
                future = torch.arange(T, device=q.device) >= ((positions + 1) // self.ratio)[..., None]
                cmp_logits = cmp_logits.masked_fill_(future.unsqueeze(-2), float("-inf"))
            parts.append(cmp_logits)
        sink = self.attn_sink.view(1, 1, -1, 1).expand(B, s, -1, 1)  # fp32: the cat promotes the logits too
        probs = torch.cat(parts + [sink], dim=-1).softmax(-1).to(q.dtype)

        nb, width = win_keys.shape[1], win_keys.shape[2]
        rows = W if nb > 1 else s  # queries per block
        p_win = F.pad(probs[..., :width], (0, 0, 0, 0, 0, nb * rows - s)).view(B, nb, rows, H, width)
        o = ops.contract("bnwhk,bnkd->bnwhd", p_win, win_keys).reshape(B, nb * rows, H, -1)[:, :s]
        cmp_probs = None
        if entries is not None:
            eq = "bshk,bskd->bshd" if idx is not None and not dense else "bsht,btd->bshd"
            cmp_probs = probs[..., width: -1]
            o = o + ops.contract(eq, cmp_probs, cmp_keys)
            if dense:  # report the selected entries' probabilities in idx order, as the gather path does
                at = idx.clamp(min=0)[:, :, None, :].expand(-1, -1, H, -1)
                cmp_probs = cmp_probs.detach().gather(-1, at).masked_fill_((idx < 0)[:, :, None, :], 0.0)
        return o, cmp_probs

    def step(self, x: torch.Tensor, cache: "LayerCache", step: "Step") -> torch.Tensor:
        """Incremental twin of `forward`: x [B, width, D] at the step's positions, reading and committing `cache`
        (see dsv4.model.cache). A decode step costs O(W + top-k) attention (+ the O(L/m) indexer scan) for CSA
        and O(W + L/m) for HCA."""
        B, s, _ = x.shape
        cos, sin = step.rope(self.kind)
        qa, kv, *rest = self.x_group(x)
        qr = self.q_norm(qa)
        qb, *index_q = self.qr_group(qr)
        q = rms_norm(qb.view(B, s, self.n_heads, self.head_dim), self.norm_eps)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None]) * self.softmax_scale
        kv = apply_rope(self.kv_norm(kv), cos, sin)  # [B, s, d]
        keys = torch.cat([step.read_ring(cache.window), kv], dim=1)  # positions start-W .. start+s-1
        step.write_ring(cache.window, kv)
        entries = idx = rows = None
        if self.compressor is not None:
            self.compressor.step(rest[0], rest[1], cache.compressed, step)
            count = step.end // self.ratio
            if self.indexer is not None:
                idx = self.indexer.step(index_q[0], *rest[2:], cache.index, step)
            if idx is not None and count > self.DENSE_SELECT * idx.shape[-1]:  # gather the top-k in place
                entries, rows = cache.compressed.entries, step.slots
            else:
                entries = cache.compressed.entries[step.slots, :count]  # [B, T, d]
        o = self.attend_blocks(q, keys, entries, idx, step.start, rows)
        return self.project_out(apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True))

    # scores a query block may hold at once (queries x heads x keys) when a long chunk attends to many entries
    ATTEND_BUDGET = 1 << 23

    def attend_blocks(self, q: torch.Tensor, keys: torch.Tensor, entries: torch.Tensor | None,
                      idx: torch.Tensor | None, start: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`attend` a step's queries in blocks (whole windows where they fit) sized so that no block holds more than
        ATTEND_BUDGET logits: a long prefill chunk reading every compressed entry (HCA) stays bounded in memory."""
        B, s, H, _ = q.shape
        W = self.window
        if entries is None:
            width = 0
        elif idx is not None and rows is not None:
            width = idx.shape[-1]
        else:
            width = entries.shape[1]
        n = max(self.ATTEND_BUDGET // (B * H * (2 * W + width + 1)), 1)
        n = n // W * W if n >= W else n  # whole windows where they fit (fewer window-score blocks)
        if s <= n or torch.compiler.is_compiling():
            return self.attend(q, keys, entries, idx, start, rows)[0]
        return torch.cat([self.attend(q[:, a: a + n], keys[:, a: W + a + n], entries,
                                      None if idx is None else idx[:, a: a + n], start + a, rows)[0]
                          for a in range(0, s, n)], dim=1)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """[B, S, H, d] -> [B, S, D] through the grouped low-rank projection."""
        B, S = o.shape[:2]
        G = self.o_groups
        o = o.reshape(B, S, G, -1)
        wo_a = self.wo_a.grouped(G)  # [G, R, (H/G) d]
        return self.wo_b(self.ops.grouped_linear(o, wo_a).flatten(2))
