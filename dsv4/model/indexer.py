"""Lightning indexer of compressed sparse attention (DeepSeek-V3.2 / V4): picks, for every query, the top-k
compressed entries it will attend to.

    K^I_s = Compressor_{index_head_dim}(x)_s                           (overlapping, like the CSA compressor)
    q_{t,h} = RoPE(wq_b(q_lora_t))_h ,   w_{t,h} = weights_proj(x_t)_h / sqrt(index_head_dim * n_heads)
    I[t, s] = sum_h w_{t,h} * relu(q_{t,h} . K^I_s)                     for visible s < (t+1) // m
    selected(t) = top-k_s I[t, s];  slots beyond the visible count are -1.

Tie-break (documented, deterministic): among equal scores the more recent entry (higher s) wins. With ReLU
scores exact ties happen when every head's dot product is <= 0; then recency is the natural prior.
Queries are processed in blocks so the [S, T] score matrix never exists whole.

Long contexts (`Indexer.scan`): the entries are read SCAN_BLOCK at a time and each block's top-k is merged into a
running top-k (exact: by (score, index), so the result is the one-shot selection's), so a chunk of s queries holds
O(s * SCAN_BLOCK) scores whatever the context. The block (`scan_block`: matmuls in the model's dtype over SCAN_SUB
entries at a time, then ReLU, the head-weighted sum in fp32, the mask, the top-k and the merge) is the superlinear part
of a long prefill; `dsv4.kernels.compile.compile_scan` swaps in a torch.compile'd copy that fuses everything after
each matmul. The top-k with its recency tie-break is dsv4.kernels.topk.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelArgs
from dsv4.kernels.fused import Linear, Products
from dsv4.kernels.topk import exact_key, tied_at_kth, topk_recent_fast
from dsv4.model.compressor import Compressor
from dsv4.model.rope import apply_rope

if TYPE_CHECKING:
    from dsv4.model.cache import CompressedState, Step


def block_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, sub: int | None = None) -> torch.Tensor:
    """Scores of one block of entries: q [B, n, H, c] and keys [B, Tb, c] in the compute dtype, w [B, n, H] fp32
    (scaled) -> sum_h w * relu(q_h . k) [B, n, Tb] fp32 (the dot products rounded to the compute dtype, as in
    `Indexer.scores`). sub: take the entries `sub` at a time, so the [n, H, sub] dot products stay in cache (they are
    H times the scores, and the matmul, with an inner dimension of only c, is bound by writing them)."""
    B, n, H, c = q.shape
    Tb = keys.shape[1]
    if sub is not None and Tb > sub:
        return torch.cat([block_scores(q, keys[:, j: j + sub], w) for j in range(0, Tb, sub)], dim=-1)
    dots = torch.bmm(q.reshape(B, n * H, c), keys.transpose(1, 2)).view(B, n, H, -1)
    return (dots.relu().float() * w[..., None]).sum(2)


def visible_block_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, visible: torch.Tensor,
                         first: torch.Tensor | int, sub: int | None = None) -> torch.Tensor:
    """`block_scores` of entries first..first+Tb-1, -inf at or beyond each query's `visible` [B, n] count."""
    at = first + torch.arange(keys.shape[1], device=q.device)
    return block_scores(q, keys, w, sub).masked_fill(at >= visible[..., None], float("-inf"))


def scan_block(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, visible: torch.Tensor, first: torch.Tensor,
               best: torch.Tensor, best_at: torch.Tensor, ambiguous: torch.Tensor, sub: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of the scan: `visible_block_scores` of the entries from `first`, their top-k merged into the running
    top-k (best [B, n, k] fp32 scores and best_at [B, n, k] their entries, -inf / -1 where none yet) -> the new
    (best, best_at, ambiguous): `ambiguous` [B, n] accumulates the rows where a k-th score tied a candidate left out
    (the block's or the merge's), whose selection the caller redoes on exact (score, index) keys. No host sync."""
    scores = visible_block_scores(q, keys, w, visible, first, sub)
    vals, pos = scores.topk(min(best.shape[-1], scores.shape[-1]), dim=-1, sorted=False)
    ambiguous = ambiguous | tied_at_kth(scores, vals)
    cand, cand_at = torch.cat([best, vals], dim=-1), torch.cat([best_at, pos + first], dim=-1)
    best, pos = cand.topk(best.shape[-1], dim=-1, sorted=False)
    return best, cand_at.gather(-1, pos), ambiguous | tied_at_kth(cand, best)


@dataclass
class _QueryGroup:
    """`Indexer.scan`'s state for one block of queries: its inputs (padded to SCAN_QUERIES rows, of which the first
    n are real), the block function, how many entries they see, and the running top-k."""
    n: int
    q: torch.Tensor
    w: torch.Tensor
    visible: torch.Tensor
    fn: Callable
    seen: int
    best: torch.Tensor
    best_at: torch.Tensor
    ambiguous: torch.Tensor


class Indexer(nn.Module):
    ops = Products  # the product set (dsv4.kernels.fused)
    scan_block = staticmethod(scan_block)  # one block of the long-context scan; compile_scan gives instances a copy
    # the long-context scan: entries per block (a shorter last block is padded to a power of two >= SCAN_MIN_BLOCK,
    # so a compiled scan has a few shapes), entries per matmul inside a block (`block_scores`' sub), queries per
    # block, and the score count (queries x heads x entries) above which `step` scans instead of scoring every entry
    # at once
    SCAN_BLOCK, SCAN_MIN_BLOCK, SCAN_SUB, SCAN_QUERIES, SCAN_ABOVE = 16384, 1024, 1024, 64, 1 << 22

    def __init__(self, args: ModelArgs, block_size: int = 1024):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.ratio, self.block_size = args.csa_ratio, block_size
        self.wq_b = Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = Linear(args.dim, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.dim, args.index_head_dim, args.csa_ratio, overlap=True, eps=args.norm_eps)

    def prepare(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Everything the scan needs, computed once: queries q [B, S, H, c], compressed keys [B, T, c] and head
        weights w [B, S, H] (in the compute dtype: the scan is the one superlinear part of the model)."""
        B, S, _ = x.shape
        keys = self.compressor(x, cos, sin)
        q = apply_rope(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), cos[:S, None], sin[:S, None])
        w = self.weights_proj(x) * (self.head_dim * self.n_heads) ** -0.5
        return q, keys, w

    def scores(self, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """I[t, s] for queries q [B, s, H, c] (weights w [B, s, H]) at `positions` ([s], or [B, s] when rows
        differ) against keys [B, T, c]: [B, s, T] fp32, -inf on entries not yet visible to the query."""
        ops = self.ops.for_rows(q.shape[:2].numel())  # the products for this many query rows (dsv4.kernels.fused)
        scores = ops.contract("bshc,btc->bsht", q, keys).relu_()  # [B, s, H, T]
        scores = ops.contract("bsht,bsh->bst", scores.float(), w.float())
        visible = (positions + 1) // self.ratio
        return scores.masked_fill(torch.arange(keys.shape[1], device=q.device) >= visible[..., None], float("-inf"))

    def select(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-k visible entries per query: [B, s, min(topk, T)], -1 where fewer entries are visible."""
        k = min(self.topk, scores.shape[-1])
        if k == 0:
            return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
        visible = (positions + 1) // self.ratio
        idx = topk_recent_fast(scores, k)
        return torch.where(idx < visible[..., None], idx, -1)

    def scan(self, q: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
             entries: Callable[[int, int], torch.Tensor], count: int) -> torch.Tensor:
        """`select(scores(...))` for long contexts, in bounded memory: the same selection (up to float summation
        order), reading `SCAN_QUERIES` queries x `SCAN_BLOCK` entries at a time. Each block's top-k is merged into
        the running top-k of its queries (the k best of the union of every block's k best are the k best overall);
        rows where a tie at the k-th score made that ambiguous are redone on exact (score, index) keys at the end.
        q [B, s, H, c], w [B, s, H] (scaled), positions [s] or [B, s]; entries(j0, j1) -> the keys [B, j1 - j0, c]
        of entries j0..j1-1 (slices of a tensor or of a cache: nothing of size `count` is copied, and each block is
        read once for all the queries); count: how many entries exist -> [B, s, min(topk, count)], -1 where fewer
        are visible."""
        B, s = q.shape[:2]
        k = min(self.topk, count)
        visible = ((positions + 1) // self.ratio).clamp(max=count).expand(B, s)
        w = w.float()
        nq = self.SCAN_QUERIES
        groups = []
        for a in range(0, s, nq):
            n = min(nq, s - a)
            vis, qa, wa = visible[:, a: a + n], q[:, a: a + n], w[:, a: a + n]
            fn = self.scan_block
            if n < nq and s > nq:  # the end of a long chunk: padded to the one query-block shape (rows dropped)
                qa, wa = F.pad(qa, (0, 0, 0, 0, 0, nq - n)), F.pad(wa, (0, 0, 0, nq - n))
                vis = F.pad(vis, (0, nq - n))
            elif n < nq:  # a few queries (decoding): not worth a compiled shape of their own
                fn = scan_block
            best = torch.full((*vis.shape, k), float("-inf"), device=q.device)
            best_at = torch.full((*vis.shape, k), -1, dtype=torch.long, device=q.device)
            # one memory layout (strides of size-1 dims too): one compiled graph per block width
            qa, wa, vis = (torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t) for t in (qa, wa, vis))
            groups.append(_QueryGroup(n, qa, wa, vis, fn, int(vis.max()), best, best_at,
                                      torch.zeros_like(vis, dtype=torch.bool)))
        seen = max(g.seen for g in groups)  # entries any of these queries can see
        for j0 in range(0, seen, self.SCAN_BLOCK):
            keys = self._block(entries, j0, seen)
            first = torch.tensor(j0, device=q.device)
            for g in groups:
                if g.seen > j0:  # (causal: the early queries of a chunk see fewer blocks)
                    g.best, g.best_at, g.ambiguous = g.fn(g.q, keys, g.w, g.visible, first, g.best, g.best_at,
                                                          g.ambiguous, self.SCAN_SUB)
        out = []
        for g in groups:
            if g.ambiguous.any():  # rare (exact ties at the k-th score): those rows again, on exact keys
                b_, r_ = g.ambiguous.nonzero(as_tuple=True)
                g.best_at[b_, r_] = self._exact_rows(g.q[b_, r_], g.w[b_, r_], g.visible[b_, r_], b_, entries, k)
            out.append(torch.where(g.best_at < g.visible[..., None], g.best_at, -1)[:, :g.n])
        return torch.cat(out, dim=1)

    def scan_widths(self, entries: int, queries: int) -> list[int]:
        """The block widths of this indexer's compiled scan (compile_scan) that chunks of `queries` positions reach in
        a context of `entries` compressed entries (none when the scan is not compiled, or never used there)."""
        if "scan_block" not in self.__dict__ or queries * self.n_heads * entries <= self.SCAN_ABOVE:
            return []
        widths = [self.SCAN_MIN_BLOCK]
        while widths[-1] < min(entries, self.SCAN_BLOCK):
            widths.append(2 * widths[-1])
        return widths

    @torch.no_grad()
    def warm_scan(self, widths: list[int], dtype: torch.dtype, device):
        """Run the compiled scan block once at each of `widths` (`scan_widths`) on zeros, so that a long prefill never
        stops to compile them (a server's running streams would wait)."""
        nq, k = self.SCAN_QUERIES, self.topk
        q = torch.zeros(1, nq, self.n_heads, self.head_dim, dtype=dtype, device=device)
        w = torch.zeros(1, nq, self.n_heads, device=device)
        visible = torch.zeros(1, nq, dtype=torch.long, device=device)
        best = torch.full((1, nq, k), float("-inf"), device=device)
        best_at = torch.full((1, nq, k), -1, dtype=torch.long, device=device)
        for width in widths:
            keys = torch.zeros(1, width, self.head_dim, dtype=dtype, device=device)
            self.scan_block(q, keys, w, visible, torch.tensor(0, device=device), best, best_at,
                            torch.zeros_like(visible, dtype=torch.bool), self.SCAN_SUB)

    def _block(self, entries: Callable[[int, int], torch.Tensor], j0: int, seen: int) -> torch.Tensor:
        """Entries j0.. of the scan (at most SCAN_BLOCK, and none at or beyond `seen`), zero-padded to the block's
        width: SCAN_BLOCK, or for a shorter last block a power of two >= SCAN_MIN_BLOCK (a few compiled shapes)."""
        keys = entries(j0, min(j0 + self.SCAN_BLOCK, seen))
        width = min(max(self.SCAN_MIN_BLOCK, 1 << (keys.shape[1] - 1).bit_length()), self.SCAN_BLOCK)
        return F.pad(keys, (0, 0, 0, width - keys.shape[1]))

    def _exact_rows(self, q: torch.Tensor, w: torch.Tensor, visible: torch.Tensor, batch: torch.Tensor,
                    entries: Callable[[int, int], torch.Tensor], k: int) -> torch.Tensor:
        """The top-k of single query rows by exact (score, index) keys, block by block: q [R, H, c], w [R, H],
        visible [R], batch [R] (each row's batch row in `entries`) -> entry indices [R, k] (-1 padded)."""
        q, w, visible = q[:, None], w[:, None], visible[:, None]
        best = torch.empty(len(q), 1, 0, device=q.device)
        best_at = torch.empty(len(q), 1, 0, dtype=torch.long, device=q.device)
        seen = int(visible.max())
        for j0 in range(0, seen, self.SCAN_BLOCK):
            keys = self._block(entries, j0, seen)[batch]
            scores = visible_block_scores(q, keys, w, visible, j0)
            cand = torch.cat([best, scores], dim=-1)
            cand_at = torch.cat([best_at, j0 + torch.arange(keys.shape[1], device=q.device).expand_as(scores)], -1)
            pos = exact_key(cand, cand_at).topk(min(k, cand.shape[-1]), dim=-1, sorted=False).indices
            best, best_at = cand.gather(-1, pos), cand_at.gather(-1, pos)
        return F.pad(best_at[:, 0], (0, k - best_at.shape[-1]), value=-1)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], qr [B, S, q_lora] (normed query latent), cos/sin [S, R/2] (compress rope)
        -> selected entry indices [B, S, min(topk, S // m)], -1 where fewer entries are visible.
        Queries go `block_size` at a time, so the [block, H, T] scores never exist for all S at once."""
        q, keys, w = self.prepare(x, qr, cos, sin)
        S = x.shape[1]
        out = []
        for t0 in range(0, S, self.block_size):
            t1 = min(t0 + self.block_size, S)
            positions = torch.arange(t0, t1, device=x.device)
            out.append(self.select(self.scores(q[:, t0:t1], keys, w[:, t0:t1], positions), positions))
        return torch.cat(out, dim=1)

    def step(self, q: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, state: "CompressedState",
             step: "Step") -> torch.Tensor:
        """Incremental twin of `forward` over a cache, given the step's projections: q = wq_b(qr), the compressor's
        kv = wkv(x) and gate = wgate(x), w = weights_proj(x). Commits the step's compressed keys, then selects for each
        query among the entries it can see. -> [B, width, min(topk, T)]."""
        B, s, _ = q.shape
        self.compressor.step(kv, gate, state, step)
        cos, sin = step.rope("csa")
        q = apply_rope(q.view(B, s, self.n_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        w = w * (self.head_dim * self.n_heads) ** -0.5
        count = step.end // self.ratio
        if self.long(q, count):
            return self.scan(q, w, step.positions, lambda j0, j1: state.entries[step.slots, j0:j1], count)
        keys = state.entries[step.slots, :count]  # [B, T, c]
        return self.select(self.scores(q, keys, w, step.positions), step.positions)

    def long(self, q: torch.Tensor, count: int) -> bool:
        """Scan in blocks (eager only: a compiled step keeps its single-pass shape)?"""
        return not torch.compiler.is_compiling() and q.shape[:3].numel() * count > self.SCAN_ABOVE


def indexer_kl(scores: torch.Tensor, cmp_probs: torch.Tensor, idx: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(main attention || indexer) over the compressed entries, summed over queries (DeepSeek-V3.2's indexer loss).
    scores [B, s, T] (indexer, fp32, -inf = invisible); cmp_probs [B, s, H, k or T] the main attention's probabilities
    on those entries (detached here); idx [B, s, k] the selected entries (sparse stage) or None (dense warm-up: all
    visible entries). Target = head-summed main probabilities renormalised; rows with no visible entry are skipped.
    Returns (sum of per-query KL, number of queries counted as a tensor: no host sync, no graph break)."""
    target = cmp_probs.detach().float().sum(2)  # [B, s, n]
    if idx is not None:
        logits = scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    else:
        logits = scores
    mass = target.sum(-1, keepdim=True)
    valid = (mass[..., 0] > 0) & torch.isfinite(logits).any(-1)
    target = target / mass.clamp(min=1e-30)
    log_q = torch.log_softmax(logits.masked_fill(~valid[..., None], 0.0), dim=-1)
    terms = torch.xlogy(target, target) - torch.where(target > 0, target * log_q, torch.zeros_like(log_q))
    return (terms.sum(-1) * valid).sum(), valid.sum()
