"""Engram conditional memory (arXiv 2601.07372; shipped in DeepSeek-V4.1-Flash): hashed n-gram embedding tables that a
block reads by token ids alone, gated into each hyper-connection stream before its attention.

    compressed ids   c = lookup[token id]: ids whose decodings normalise to one key share one id (`compress_vocab`)
    n-gram hash      for order n = 2..N:  mix_n = XOR_{k<n} (c_{t-k} * m_k)     (int64 products wrap; the pad id
                     stands in before the sequence start; odd multipliers m from numpy's default_rng(seed + 10007 l))
    rows             row_{n,j} = mix_n mod p_{n,j}: one prime table size per (order, head), never reused
    e                concat over (order, head) of table[offset_{n,j} + row_{n,j}]              [B, S, E]
    gate per stream  k_i = rmsnorm(W_K^i e), q_i = rmsnorm(h_i), g = <q_i, k_i> / sqrt(D),
                     alpha_i = sigmoid(sign(g) sqrt(max(|g|, 1e-6)))
    out_i            u_i = alpha_i * (W_V e);  paper: u + silu(causal depthwise conv(rmsnorm(u))) (kernel 4,
                     dilation N); V4.1: u
    h_i <- h_i + out_i, before the block's attention, at the configured layers only.

Addresses depend on token ids alone (`EngramHash.rows`), so a batch's rows are known before the forward pass and the
table can sit on another device than the rest of the block (host memory, or a memory-mapped file for inference): the
block gathers its rows there and moves only the gathered rows. The table is an `nn.Embedding(sparse=True)`: training
touches only the rows a batch read (`dsv4.train.optim` steps it with a lazy, row-wise Adam).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels import engram as kernels
from dsv4.kernels.fused import Linear
from dsv4.model.norm import RMSNorm

SENTINEL = "\ue000"  # keeps a token that is a lone space from being stripped to nothing
PRIME_STEP = 10007  # per-layer seed offset of the hash multipliers
INT64_MAX = np.iinfo(np.int64).max


# ---- tokenizer compression ------------------------------------------------------------------------------------------
@cache
def key_normalizer():
    """NFKC, NFD, strip accents, lowercase, whitespace runs -> one space, a lone space protected, strip."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), SENTINEL),
        normalizers.Strip(), normalizers.Replace(SENTINEL, " ")])


def token_key(decoded: str, raw: str | None) -> str:
    """The key one token is merged by: its normalised decoding (the decoding itself if that normalises to nothing);
    a decoding with U+FFFD (a byte fragment) is keyed by the raw token string instead."""
    if "\ufffd" in decoded:
        return raw if raw is not None else decoded
    return key_normalizer().normalize_str(decoded) or decoded


def compress_vocab(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """Compressed id of every token id [vocab_size] int64 (ids past the tokenizer's decode to ''): each id decoded
    alone by the tokenizer's own decoder, keyed by `token_key`, keys numbered in order of first appearance."""
    tok = getattr(tokenizer, "tok", tokenizer)  # dsv4's Tokenizer wraps a `tokenizers.Tokenizer`
    n = vocab_size or tok.get_vocab_size(with_added_tokens=True)
    keys: dict[str, int] = {}
    lookup = np.empty(n, dtype=np.int64)
    for tid in range(n):
        key = token_key(tok.decode([tid], skip_special_tokens=False), tok.id_to_token(tid))
        lookup[tid] = keys.setdefault(key, len(keys))
    return lookup


# ---- hashing --------------------------------------------------------------------------------------------------------
def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in small:
        return True
    if any(n % p == 0 for p in small):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def multipliers(seed: int, layer: int, max_ngram: int, compressed_vocab: int) -> list[int]:
    """The layer's odd hash multipliers m_0 .. m_{N-1}, bounded so that id * m stays within int64."""
    half = max(1, int(INT64_MAX // compressed_vocab) // 2)
    r = np.random.default_rng(seed + PRIME_STEP * layer).integers(0, half, size=(max_ngram,), dtype=np.int64)
    return [int(m) for m in r * 2 + 1]


def table_sizes(layers: list[int], max_ngram: int, heads: int, vocab: list[int]) -> dict[int, list[list[int]]]:
    """{layer: [[prime per head] per order n = 2..N]}: for each (layer, order) in turn, each head takes the next prime
    above the previous head's (the first searched from the order's configured size), never one taken before."""
    seen: set[int] = set()
    out = {}
    for layer in layers:
        orders = []
        for n in range(2, max_ngram + 1):
            p, primes = vocab[n - 2] - 1, []
            for _ in range(heads):
                p += 1
                while p in seen or not is_prime(p):
                    p += 1
                seen.add(p)
                primes.append(p)
            orders.append(primes)
        out[layer] = orders
    return out


def hash_rows(ids: torch.Tensor, mults: torch.Tensor, primes: torch.Tensor, pad: int | torch.Tensor,
              context: torch.Tensor | None = None) -> torch.Tensor:
    """Compressed ids [B, S] (and the N-1 ids before them [B, N-1]; None: the pad id, an int or a 0-d tensor) ->
    each position's row in each (order, head) table, order-major [B, S, (N-1) H], within that head's table.
    mults [N] int64, primes [N-1, H]."""
    N = mults.numel()
    B, S = ids.shape
    if context is None:
        context = torch.as_tensor(pad, device=ids.device).expand(B, N - 1)
    x = torch.cat([context.to(ids.dtype), ids], dim=1).long()
    mix = x[:, N - 1:] * mults[0]
    rows = []
    for k in range(1, N):  # order n = k + 1 adds the token k back
        mix = mix ^ (x[:, N - 1 - k: N - 1 - k + S] * mults[k])
        rows.append(torch.remainder(mix.unsqueeze(-1), primes[k - 1]))  # non-negative, as Python's %
    return torch.cat(rows, dim=-1)


class EngramHash:
    """One layer's addressing: multipliers, prime table sizes, offsets of each head's table in the shared one."""

    def __init__(self, layer: int, seed: int, max_ngram: int, compressed_vocab: int, primes: list[list[int]]):
        self.mults = multipliers(seed, layer, max_ngram, compressed_vocab)
        self.primes = primes
        flat = [p for order in primes for p in order]
        self.offsets = [sum(flat[:i]) for i in range(len(flat))]
        self.n_rows = sum(flat)
        self._tensors: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tensors:
            self._tensors[device] = (torch.tensor(self.mults, dtype=torch.long, device=device),
                                     torch.tensor(self.primes, dtype=torch.long, device=device),
                                     torch.tensor(self.offsets, dtype=torch.long, device=device))
        return self._tensors[device]

    def rows(self, ids: torch.Tensor, pad: int | torch.Tensor, context: torch.Tensor | None = None,
             offset: bool = True) -> torch.Tensor:
        """Compressed ids [B, S] -> rows [B, S, (N-1) H] of the layer's shared table (offset=False: within each
        head's own table)."""
        mults, primes, offsets = self.tensors(ids.device)
        rows = hash_rows(ids, mults, primes, pad, context)
        return rows + offsets if offset else rows


def engram_hashes(args) -> dict[int, EngramHash]:
    """{layer: its addressing} for a model's ModelArgs (empty without Engram)."""
    if not args.engram:
        return {}
    sizes = table_sizes(args.engram_layers, args.engram_max_ngram, args.engram_heads, args.engram_vocab)
    return {layer: EngramHash(layer, args.engram_seed, args.engram_max_ngram, args.compressed_vocab, sizes[layer])
            for layer in args.engram_layers}


# ---- the module -----------------------------------------------------------------------------------------------------
class Engram(nn.Module):
    """One layer's Engram: table lookup, context-aware gating per stream, value, optional short convolution."""

    def __init__(self, args, layer_id: int, hashing: EngramHash):
        super().__init__()
        n, D = args.hc_mult, args.dim
        self.layer_id, self.hashing, self.n, self.dim = layer_id, hashing, n, D
        orders, heads = args.engram_max_ngram - 1, args.engram_heads
        self.head_dim = args.engram_dim // heads
        width = orders * heads * self.head_dim  # E: the concatenated rows
        self.table = nn.Embedding(hashing.n_rows, self.head_dim, sparse=True)
        self.key = Linear(width, n * D, bias=True)
        self.value = Linear(width, D, bias=True)
        self.key_norm = RMSNorm((n, D), args.norm_eps)  # one weight per stream, in fp32
        self.query_norm = RMSNorm((n, D), args.norm_eps)
        self.kernel, self.dilation = args.engram_kernel, args.engram_max_ngram
        if args.engram_conv:
            self.conv_norm = RMSNorm((n, D), args.norm_eps)
            self.conv = nn.Conv1d(n * D, n * D, self.kernel, dilation=self.dilation, groups=n * D, bias=False)
        else:
            self.conv_norm = self.conv = None

    @property
    def conv_context(self) -> int:
        """Positions before a step that the short convolution reads (0 without it)."""
        return (self.kernel - 1) * self.dilation if self.conv is not None else 0

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [B, S, H'] of the shared table -> e [B, S, E] on the rows' device, gathered where the table lives.
        A compiled inference step on the table's device gathers them in its graph (a plain index: no gradient to
        make sparse), so the step stays one graph; otherwise `_lookup`, left to eager."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and rows.device == self.table.weight.device:
            return self.table.weight[rows].flatten(-2)
        return self._lookup(rows)

    @torch.compiler.disable  # a sparse-gradient lookup, possibly on another device: left to eager in compiled blocks
    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        e = kernels.lookup(self.table.weight, rows.to(self.table.weight.device)).flatten(-2)
        return e.to(rows.device)

    def forward(self, h: torch.Tensor, rows: torch.Tensor, conv_state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Streams h [B, S, n, D] fp32, rows [B, S, H'] -> (h + out, the convolution's input [B, S, n D] fp32 for a
        cache to keep, or None without the convolution). conv_state [B, conv_context, n D]: that input at the
        positions before this step (zeros before the sequence start); None = the sequence starts here.

        The formulas of the module docstring, arranged for fewer passes over [B, S, n, D] (`dsv4.kernels.engram`):
        the two norms of the gate fold into one weight of a single product, and rmsnorm(alpha v) = s v with
        s = alpha / sqrt(alpha^2 mean(v^2) + eps), its per-channel weight folded into the depthwise convolution's
        taps. tests/test_engram.py holds the module to the formulas written out per stream."""
        dtype = self.key.dtype
        e = self.lookup(rows).to(dtype)
        k = self.key(e).to(h.dtype).unflatten(-1, (self.n, self.dim))
        g = kernels.gate_logit(h, k, self.query_norm.weight * self.key_norm.weight, self.key_norm.eps)
        alpha = torch.sigmoid(g.sign() * g.abs().clamp_min(1e-6).sqrt()).unsqueeze(-1)  # [B, S, n, 1]
        v = self.value(e).to(h.dtype).unsqueeze(-2)  # [B, S, 1, D]
        if self.conv is None:
            return torch.addcmul(h, alpha, v), None
        s = alpha * torch.rsqrt(alpha.square() * v.square().mean(-1, keepdim=True) + self.conv_norm.eps)
        x = (s * v).flatten(-2)  # [B, S, n D]: the normed u without its weight
        taps = self.conv.weight[:, 0].to(h.dtype) * self.conv_norm.weight.flatten().unsqueeze(-1)  # [n D, kernel]
        y = kernels.causal_conv(x, taps, self.dilation, conv_state)
        return h + torch.addcmul(F.silu(y).unflatten(-1, (self.n, self.dim)), alpha, v), x

    def reset_parameters(self, std: float = 0.02):
        """Table and projections N(0, std), biases 0, the convolution as PyTorch initialises one (the demo's)."""
        nn.init.normal_(self.table.weight, std=std)
        nn.init.zeros_(self.key.bias)
        nn.init.zeros_(self.value.bias)
        if self.conv is not None:
            self.conv.reset_parameters()
