"""Inference state of a DeepSeek-V4 model: everything a sequence needs to continue, preallocated per slot.

Per layer and sequence slot:
    window      [W, d]          the last W shared keys (= values), a ring indexed by position % W
    compressed  (CSA / HCA)     closed entries [max_len/m, d]; the projected kv and gate rows of the last R positions
                                (R = m for HCA: the window not yet closed; R = 2m for CSA: also the previous window,
                                whose first-half channels the overlapping compressor borrows), a ring by position % R
    index       (CSA)           the lightning indexer's compressed keys, kept the same way
    conv        (Engram layers with the short convolution) its input at the last (kernel - 1) * dilation positions
Per sequence slot, with Engram: the compressed ids of the last N - 1 positions (the n-gram hash's context).
Both Engram rings hold one row more than they are read by (see the note on re-run positions below).

A model step (`Transformer.step`) reads this state, computes `width` new positions for every row of a batch and
commits only each row's first `length` of them, so rows of different lengths (continuous batching) and drafts that
may be rejected (speculative decoding) share one code path. Writes that must not land (padding, superseded ring
rows, windows not closed) go to one spare `trash` slot instead of being masked out: no data-dependent shapes.
Nothing grows with the sequence except the entries' fill level; a slot is reusable at once (reads are masked by
position, so a new sequence never sees its predecessor's rows).

A step may also commit one position too many, provided the next step runs that position again (a rejected
speculative draft): position q's writes land in ring rows of position q - W (window) or q - R (compressor rows),
which no query at q or later reads, and in the entry of the window q closes, which the re-run recomputes and
rewrites before anything reads it.
"""

from dataclasses import dataclass, field

import torch

from dsv4.config import ModelArgs


@dataclass
class CompressedState:
    entries: torch.Tensor  # [slots + 1, max_len // m, d]  (compute dtype)
    kv: torch.Tensor  # [slots + 1, R, width]  fp32 projected rows by position % R
    gate: torch.Tensor  # [slots + 1, R, width]  fp32 gate logits (before the window-position bias)

    @classmethod
    def empty(cls, slots: int, max_len: int, ratio: int, dim: int, overlap: bool, device, dtype) -> "CompressedState":
        rows, width = (2 if overlap else 1) * ratio, (2 if overlap else 1) * dim
        # (at least one row: writes of windows that do not close still need somewhere to land in the spare slot)
        return cls(torch.zeros(slots + 1, max(max_len // ratio, 1), dim, device=device, dtype=dtype),
                   torch.zeros(slots + 1, rows, width, device=device, dtype=torch.float32),
                   torch.zeros(slots + 1, rows, width, device=device, dtype=torch.float32))

    def tensors(self) -> list[torch.Tensor]:
        return [self.entries, self.kv, self.gate]


@dataclass
class LayerCache:
    window: torch.Tensor  # [slots + 1, W, d]
    compressed: CompressedState | None = None
    index: CompressedState | None = None
    conv: torch.Tensor | None = None  # Engram's short convolution: [slots + 1, context + 1, n * dim] fp32

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.window]
        for state in (self.compressed, self.index):
            if state is not None:
                parts += state.tensors()
        return parts + ([self.conv] if self.conv is not None else [])


class KVCache:
    """Preallocated state of `slots` sequences of up to `max_len` tokens for every main and MTP layer."""

    def __init__(self, args: ModelArgs, slots: int, max_len: int, device=None, dtype: torch.dtype = torch.float32,
                 devices: list | None = None):
        """devices: one per main and MTP layer, where that layer runs (a placed model: its layer's device, see
        dsv4.weights.placement.cache_devices); None puts every layer on `device`. Engram's ids stay on `device`."""
        if devices is not None and len(devices) != args.n_layers + args.n_mtp_layers:
            raise ValueError(f"a cache needs one device per main and MTP layer "
                             f"({args.n_layers + args.n_mtp_layers}), got {len(devices)}")
        if slots < 1:
            raise ValueError(f"a cache needs at least one slot, got {slots}")
        if not 0 < max_len <= args.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, max_seq_len={args.max_seq_len}], got {max_len}")
        self.args, self.slots, self.max_len, self.dtype = args, slots, max_len, dtype
        self.trash = slots  # the spare slot that absorbs writes which must not land
        self.layers: list[LayerCache] = []
        for layer_id in range(args.n_layers + args.n_mtp_layers):
            at = device if devices is None else devices[layer_id]
            kind, ratio = args.layer_kind(layer_id), args.compress_ratios[layer_id]
            cache = LayerCache(torch.zeros(slots + 1, args.window_size, args.head_dim, device=at, dtype=dtype))
            if ratio:
                cache.compressed = CompressedState.empty(slots, max_len, ratio, args.head_dim, kind == "csa", at, dtype)
            if kind == "csa":
                cache.index = CompressedState.empty(slots, max_len, ratio, args.index_head_dim, True, at, dtype)
            if layer_id in args.engram_layers and args.engram_conv:
                context = (args.engram_kernel - 1) * args.engram_max_ngram
                cache.conv = torch.zeros(slots + 1, context + 1, args.hc_mult * args.dim, device=at)  # fp32
            self.layers.append(cache)
        # the compressed ids of each sequence's last N - 1 positions (+ 1 row), for Engram's n-gram hash
        self.engram_ids = (torch.zeros(slots + 1, args.engram_max_ngram, device=device, dtype=torch.long)
                           if args.engram else None)

    @property
    def main(self) -> list[LayerCache]:
        return self.layers[: self.args.n_layers]

    @property
    def mtp(self) -> list[LayerCache]:
        return self.layers[self.args.n_layers:]

    def nbytes(self) -> int:
        """Bytes allocated (all slots, the spare one included)."""
        parts = [t for layer in self.layers for t in layer.tensors()]
        parts += [self.engram_ids] if self.engram_ids is not None else []
        return sum(t.numel() * t.element_size() for t in parts)

    def slot_state(self, layers: int) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
        """The first `layers` layers' state (and Engram's ids), split as a copy of one slot needs it
        (dsv4.engine.prefix): the rings, whose slot rows are whole at any position, and the entry buffers with each
        one's ratio m (entry i closes at position (i + 1) m - 1 and never changes afterwards)."""
        rings, entries = [], []
        for layer_id, layer in enumerate(self.layers[:layers]):
            rings.append(layer.window)
            for state in (layer.compressed, layer.index):
                if state is not None:
                    rings += [state.kv, state.gate]
                    entries.append((state.entries, self.args.compress_ratios[layer_id]))
            rings += [layer.conv] if layer.conv is not None else []
        rings += [self.engram_ids] if self.engram_ids is not None else []
        return rings, entries

    def bytes_per_token(self) -> float:
        """Bytes that grow with the context, per token of one sequence: the compressed entries and indexer keys."""
        return bytes_per_token(self.args, self.dtype)

    def fixed_bytes_per_sequence(self) -> int:
        """Bytes each sequence holds whatever its length: window ring and the compressors' open rows."""
        rows = []
        for layer in self.layers:
            rows.append(layer.window[0])
            rows += [t[0] for state in (layer.compressed, layer.index) if state is not None
                     for t in state.tensors()[1:]]
            rows += [layer.conv[0]] if layer.conv is not None else []
        rows += [self.engram_ids[0]] if self.engram_ids is not None else []
        return sum(t.numel() * t.element_size() for t in rows)


def bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> float:
    """The context-proportional cache size per token from the config alone (the theory the cache is checked
    against): each compressed layer keeps one d-dim entry per m tokens, each CSA layer also one indexer key."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0.0
    for layer_id in range(args.n_layers + args.n_mtp_layers):
        ratio = args.compress_ratios[layer_id]
        if ratio:
            total += args.head_dim / ratio
            if args.layer_kind(layer_id) == "csa":
                total += args.index_head_dim / ratio
    return total * size


@dataclass
class Step:
    """Where one model step reads and writes: row b of the batch is cache slot `slots[b]`, its input column j is
    position `start[b] + j`, and only its first `length[b]` columns are committed to the cache.
    `rotary` maps a layer kind to its Rotary table."""
    slots: torch.Tensor  # [B] long
    start: torch.Tensor  # [B] long
    length: torch.Tensor  # [B] long
    width: int  # input columns per row
    end: int  # max over rows of start + width (bounds how many entries any query can see)
    trash: int
    rotary: dict
    positions: torch.Tensor = field(init=False)  # [B, width]
    valid: torch.Tensor = field(init=False)  # [B, width]
    _rope: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        cols = torch.arange(self.width, device=self.start.device)
        self.positions = self.start[:, None] + cols
        self.valid = cols < self.length[:, None]

    def rope(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, width, R/2] of the step's positions for a layer kind, computed once per step."""
        table = "swa" if kind == "swa" else "csa"
        if table not in self._rope:
            self._rope[table] = self.rotary[kind](self.positions)
        return self._rope[table]

    def read_past(self, ring: torch.Tensor, fill) -> torch.Tensor:
        """The R - 1 positions before the step from a ring of R rows kept one row longer than it is read (Engram's):
        [B, R - 1, ...], `fill` where a position is before the sequence start. The extra row is what a re-run
        position overwrites (q lands on q - R, which no query at q or later reads)."""
        past = self.read_ring(ring)[:, 1:]
        n = past.shape[1]
        before = (self.start[:, None] - n + torch.arange(n, device=ring.device)) < 0
        return torch.where(before.view(*before.shape, *[1] * (past.dim() - 2)), fill, past)

    def read_ring(self, ring: torch.Tensor) -> torch.Tensor:
        """Rows of a ring [slots + 1, R, ...] for positions start-R .. start-1 in order -> [B, R, ...]
        (positions below 0 hold whatever the slot had: callers mask them)."""
        R = ring.shape[1]
        at = (self.start[:, None] - R + torch.arange(R, device=ring.device)) % R
        return ring[self.slots[:, None], at]

    def write_ring(self, ring: torch.Tensor, rows: torch.Tensor):
        """Commit the step's rows [B, width, ...] to a ring: the last R committed positions of each row."""
        R = ring.shape[1]
        cols = torch.arange(self.width, device=ring.device)
        keep = self.valid & (cols >= self.length[:, None] - R)
        slot = torch.where(keep, self.slots[:, None], self.trash)
        ring[slot, self.positions % R] = rows.to(ring.dtype)

    def write_entries(self, entries_buf: torch.Tensor, entries: torch.Tensor, first: torch.Tensor, ratio: int):
        """Commit newly computed entries [B, K, d] of windows first .. first+K-1 where the window closed within
        the committed positions."""
        window = first[:, None] + torch.arange(entries.shape[1], device=first.device)  # [B, K]
        closed = window < ((self.start + self.length) // ratio)[:, None]
        slot = torch.where(closed, self.slots[:, None], self.trash)
        entries_buf[slot, window.clamp(max=entries_buf.shape[1] - 1)] = entries.to(entries_buf.dtype)
