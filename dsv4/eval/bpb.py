"""Held-out bits per byte: a tokenizer-independent measure of a language model.

    bpb = sum_t CE_t / (ln 2 * sum_t bytes(target_t))

where CE_t is the cross-entropy in nats of predicting target token t and bytes(target_t) the length of its UTF-8 byte
string. Dividing by bytes rather than tokens makes models with different vocabularies comparable. Targets with zero
bytes (special tokens: BOS/EOS, chat markers) carry no text; as in nanochat's `evaluate_bpb` they are left out of both
sums, so bpb measures the text alone.

`bigram_bpb` is the baseline to beat: an interpolated Kneser-Ney bigram (Chen & Goodman 1998, one discount d, no
modified counts) or an add-one bigram, fit on train tokens and scored on the same val tokens. `ngram_bpb` is the
same smoothing at any order (3 or 4: "counts phrases" where the bigram "counts pairs"); at order 2 it is the bigram.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, S] -> logits [B, S, V]


@dataclass(frozen=True)
class Bpb:
    bpb: float
    nats: float      # summed cross-entropy over the counted targets
    bytes: int       # summed byte length of the counted targets
    tokens: int      # number of counted targets

    @property
    def nats_per_token(self) -> float:
        return self.nats / max(self.tokens, 1)


def windows(tokens: torch.Tensor, seq_len: int, stride: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Cut a 1-D stream into (window, skip) pairs: windows of up to seq_len + 1 tokens starting every `stride` tokens
    (default seq_len: back to back, overlapping by one), of whose seq_len targets the first `skip` were scored by the
    window before. Every token after the first is a target exactly once; with stride < seq_len each one after the
    first window is predicted from at least seq_len - stride tokens of context (a sliding-window evaluation)."""
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    targets = len(tokens) - 1
    count = 1 + max(0, math.ceil((targets - seq_len) / stride)) if targets > 0 else 0  # until a window reaches the end
    return [(tokens[s:s + seq_len + 1], 0 if s == 0 else seq_len - stride) for s in range(0, count * stride, stride)]


def _summed(nats: torch.Tensor, targets: torch.Tensor, bytes_per_token: torch.Tensor) -> tuple[float, int, int]:
    nbytes = bytes_per_token[targets]
    counted = nbytes > 0
    return nats[counted].double().sum().item(), int(nbytes.sum()), int(counted.sum())


def _result(nats: float, nbytes: int, ntokens: int) -> Bpb:
    return Bpb(nats / (math.log(2) * nbytes) if nbytes else float("nan"), nats, nbytes, ntokens)


@torch.no_grad()
def bits_per_byte(logits_fn: LogitsFn, tokens: torch.Tensor, bytes_per_token: torch.Tensor, seq_len: int,
                  batch_size: int = 8, stride: int | None = None) -> Bpb:
    """bpb of `logits_fn` on the 1-D token stream `tokens`, read in windows of `seq_len` every `stride` tokens (see
    `windows`; default back to back). `bytes_per_token` [V]: byte length of each token id (0 for special tokens),
    e.g. from `token_byte_lengths`. `logits_fn` gets CPU ids [B, S] and moves them to its model's device itself."""
    bytes_per_token = bytes_per_token.to(torch.long)
    ws = windows(tokens.to(torch.long), seq_len, stride)
    nats, nbytes, ntokens = 0.0, 0, 0
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}  # windows of one length and skip batch together
    for w, skip in ws:
        groups.setdefault((len(w), skip), []).append(w)
    for (_, skip), same in groups.items():
        for i in range(0, len(same), batch_size):
            batch = torch.stack(same[i:i + batch_size])                # [B, S + 1]
            ids, targets = batch[:, :-1], batch[:, skip + 1:]
            logits = logits_fn(ids)[:, skip:]                          # [B, S - skip, V]
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(logits.device), reduction="none")
            n, b, t = _summed(ce.cpu(), targets.flatten(), bytes_per_token)
            nats, nbytes, ntokens = nats + n, nbytes + b, ntokens + t
    return _result(nats, nbytes, ntokens)


def bigram_prob(train: torch.Tensor, vocab_size: int, v: torch.Tensor, w: torch.Tensor,
                method: str = "kneser_ney", discount: float = 0.75) -> torch.Tensor:
    """P(w | v) elementwise for query pairs v, w (1-D) under a bigram model fit on the 1-D stream `train`.
    method "add_one":    P(w | v) = (c(v, w) + 1) / (c(v) + V)
    method "kneser_ney": `ngram_prob` of order 2, i.e. P(w | v) = max(c(v, w) - d, 0) / c(v) + d * N1+(v .) / c(v) *
                         P_cont(w), P_cont(w) = (N1+(. w) + 1) / (N1+(. .) + V) (add-one so unseen tokens keep some
                         mass); an unseen context v falls back to P_cont(w).
    Counts are kept as sorted pair keys v * V + w, so memory is O(len(train)), not O(V^2)."""
    if method not in ("add_one", "kneser_ney"):
        raise ValueError(f"unknown method {method!r}")
    V = vocab_size
    train, v, w = train.to(torch.long), v.to(torch.long), w.to(torch.long)
    if method == "kneser_ney":
        return ngram_prob(train, V, v[:, None], w, order=2, discount=discount)
    keys, pair_counts = torch.unique(train[:-1] * V + train[1:], return_counts=True)  # sorted
    c_v = torch.bincount(train[:-1], minlength=V).double()[v]                           # c(v)
    return (_lookup(keys, pair_counts, v * V + w) + 1) / (c_v + V)


def bigram_bpb(train: torch.Tensor, val: torch.Tensor, bytes_per_token: torch.Tensor, vocab_size: int,
               method: str = "kneser_ney", discount: float = 0.75) -> Bpb:
    """bpb on the 1-D stream `val` of the bigram model `bigram_prob` fit on the 1-D stream `train`."""
    val = val.to(torch.long)
    p = bigram_prob(train, vocab_size, val[:-1], val[1:], method, discount)
    return _result(*_summed(-torch.log(p), val[1:], bytes_per_token.to(torch.long)))


def _lookup(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """values[i] where keys[i] == q (keys sorted), else 0."""
    if not len(keys):
        return torch.zeros(len(q), dtype=torch.double)
    pos = torch.searchsorted(keys, q).clamp(max=len(keys) - 1)
    return torch.where(keys[pos] == q, values[pos], 0).double()


def ngram_prob(train: torch.Tensor, vocab_size: int, contexts: torch.Tensor, w: torch.Tensor, order: int,
               discount: float = 0.75) -> torch.Tensor:
    """P(w | context) under an interpolated Kneser-Ney n-gram of `order` fit on the 1-D stream `train`:

        P_k(w | h) = max(c_k(h w) - d, 0) / c_k(h .) + d * N1+(h .) / c_k(h .) * P_{k-1}(w | h[1:])
        P_1(w)     = (N1+(. w) + 1) / (N1+(. .) + V)

    where c_k is the raw count at the highest order and the continuation count N1+(. h w) (how many distinct tokens
    precede it) below; an unseen context h falls back to P_{k-1}. `contexts` [N, order - 1] holds the tokens before
    each w, the last one nearest; -1 marks a position before the stream's start (those queries use a lower order).
    n-grams are kept as sorted base-V integers (V^order must fit in int64), so memory is O(len(train))."""
    V = vocab_size
    if order < 2 or V ** order >= 2**63:
        raise ValueError(f"order must be >= 2 with vocab_size ** order < 2**63, got order {order}, vocab {V}")
    train, w = train.to(torch.long), w.to(torch.long)
    contexts = contexts.to(torch.long).reshape(len(w), order - 1)
    grams = {order: torch.unique((train.unfold(0, order, 1) * V ** torch.arange(order - 1, -1, -1)).sum(-1),
                                 return_counts=True)}                          # (sorted keys, raw counts)
    for k in range(order - 1, 0, -1):  # continuation counts: distinct tokens before each k-gram
        grams[k] = torch.unique(grams[k + 1][0] % V**k, return_counts=True)
    unigram_keys, preceders = grams[1]
    p = (_lookup(unigram_keys, preceders, w) + 1) / (len(grams[2][0]) + V)
    for k in range(2, order + 1):
        keys, counts = grams[k]
        h = contexts[:, order - k:]                                            # the last k - 1 tokens
        known = (h >= 0).all(-1)
        hq = (h.clamp(min=0) * V ** torch.arange(k - 2, -1, -1)).sum(-1)
        prefix, first = torch.unique_consecutive(keys // V, return_counts=True)  # keys sorted: prefixes grouped
        totals = torch.zeros(len(prefix), dtype=torch.long).index_add_(0, torch.repeat_interleave(
            torch.arange(len(prefix)), first), counts)                         # c_k(h .)
        c_h, followers = _lookup(prefix, totals, hq), _lookup(prefix, first, hq)
        c_hw = _lookup(keys, counts, hq * V + w)
        safe = c_h.clamp(min=1)
        p_k = (c_hw - discount).clamp(min=0) / safe + discount * followers / safe * p
        p = torch.where(known & (c_h > 0), p_k, p)
    return p


def ngram_bpb(train: torch.Tensor, val: torch.Tensor, bytes_per_token: torch.Tensor, vocab_size: int,
              order: int = 3, discount: float = 0.75) -> Bpb:
    """bpb on the 1-D stream `val` (every token after the first is a target) of `ngram_prob` fit on `train`."""
    val = val.to(torch.long)
    padded = torch.cat([torch.full((order - 2,), -1, dtype=torch.long), val[:-1]])
    p = ngram_prob(train, vocab_size, padded.unfold(0, order - 1, 1), val[1:], order, discount)
    return _result(*_summed(-torch.log(p), val[1:], bytes_per_token.to(torch.long)))


def _byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel alphabet (printable character -> byte), the inverse of the tokenizer's own table."""
    from dsv4.tokenizers.text import byte_to_char

    return {c: b for b, c in byte_to_char().items()}


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """[V] byte length of every token of a byte-level BPE `tokenizers.Tokenizer`; 0 for special (added) tokens.
    A token's string is written in the ByteLevel alphabet, one character per byte."""
    alphabet = _byte_level_alphabet()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    lengths = torch.zeros(V, dtype=torch.long)
    for i in range(V):
        s = tokenizer.id_to_token(i)
        if s is None or s in special:
            continue
        lengths[i] = len(s) if all(ch in alphabet for ch in s) else len(s.encode("utf-8"))
    return lengths
