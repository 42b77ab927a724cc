"""Prefix caching: a request whose prompt starts with tokens the engine has already run continues from a saved copy
of that state instead of prefilling them again (multi-turn chat, a shared system prompt, a regenerated answer).

A V4 sequence's cache is not a list of per-token blocks that can be shared (dsv4.model.cache): the window is a ring,
the compressors keep the open window's rows, Engram keeps the last ids and convolution inputs. So a saved prefix (a
`Snapshot`) is one slot's whole state at one position:

    rings     the slot's rows of every ring (window, compressor and indexer rows, Engram's), copied as they are
    entries   the compressed entries (and indexer keys) closed before that position. An entry never changes once
              its window closes, so a snapshot keeps only those closed since its `parent` (the snapshot its sequence
              continued from: the one it was seeded from, or its own previous one) and a restore joins the chain
    hidden    for a speculative engine, the main model's streams at the last positions (the MTP module runs a
              position once the next token is known, so it is one position behind)

Restoring writes all of it into a free slot, which is then exactly the state prefilling those tokens builds: no
matching by blocks, no partial windows to recompute (a prefix ending inside a compression window brings the
compressor's open rows with it). A snapshot with `committed` positions written serves a prompt sharing its first Q
tokens for Q = committed, and also Q = committed - 1 (a state with one position too many is a state at the
position before: the re-run rewrites what that position wrote before anything reads it, see dsv4.model.cache), which
is what a repeated prompt needs. At least one prompt token is always run, for the logits of the first new token.

The engine takes snapshots where a slot's state is whole: at prefill chunk ends on a multiple of its prefill chunk,
at the end of a prompt, and when a request finishes (its prompt and output: the next chat turn's prefix). Eviction:
the least recently used snapshot that no other snapshot or running request builds on, until the total is within the
budget.
"""

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsv4.model.cache import KVCache

if TYPE_CHECKING:
    from dsv4.engine.request import Request


@dataclass(eq=False)
class Snapshot:
    tokens: array  # the tokens run (at least committed - 1 of them; the last one written may be unknown)
    committed: int  # positions 0 .. committed - 1 are written
    mtp_done: int | None  # positions the MTP module has run (speculative engines)
    base: int  # this snapshot's own entries are those of windows base // m .. committed // m - 1
    parent: "Snapshot | None"
    rings: list[torch.Tensor]
    entries: list[torch.Tensor]
    hidden: dict[int, torch.Tensor]  # position -> the main model's streams there
    nbytes: int = 0
    refs: int = 0  # snapshots and running requests that build on this one (it cannot be evicted while > 0)
    used: int = 0  # the LRU clock when last used

    def chain(self) -> list["Snapshot"]:
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out

    def serves(self, q: int, speculative: bool) -> bool:
        """Whether restoring this state and running on from position q is exact: the main model wrote q or q + 1
        positions; the MTP module ran q - 1 or q, and the streams of q - 1 are kept."""
        if not q <= self.committed <= q + 1 or q > len(self.tokens):
            return False
        return not speculative or (q - 1 <= self.mtp_done <= q and q - 1 in self.hidden)


@dataclass
class PrefixStats:
    lookups: int = 0  # requests that looked for a prefix
    hits: int = 0
    tokens_reused: int = 0  # prompt tokens not prefilled thanks to a hit
    saved: int = 0
    evicted: int = 0


@dataclass
class Hit:
    snapshot: Snapshot
    position: int  # the request continues from here: its first `position` prompt tokens are restored
    hidden: torch.Tensor | None = None  # the streams at position - 1 (speculation)


class PrefixCache:
    """Snapshots of a KVCache's slots within `budget` bytes. `layers`: how many of the cache's layers a slot's state
    spans (the main ones, and the MTP ones when speculating)."""

    def __init__(self, cache: KVCache, budget: int, layers: int, speculative: bool):
        if budget <= 0:
            raise ValueError(f"a prefix cache needs a budget > 0 bytes, got {budget}")
        self.budget, self.speculative = budget, speculative
        self.rings, self.entry_buffers = cache.slot_state(layers)
        self.snapshots: dict[int, list[Snapshot]] = {}  # by committed
        self.nbytes = 0
        self.stats = PrefixStats()
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return sum(len(v) for v in self.snapshots.values())

    def lookup(self, prompt: Sequence[int], again: bool = False) -> Hit | None:
        """The snapshot sharing the longest prefix with `prompt` that leaves at least one token to run (again: the
        same request looking once more, not counted as a lookup)."""
        self.stats.lookups += not again
        tokens = array("l", prompt)
        for committed in sorted(self.snapshots, reverse=True):
            for q in (committed, committed - 1):
                if not 1 <= q < len(tokens):
                    continue
                for snap in self.snapshots[committed]:
                    if snap.serves(q, self.speculative) and snap.tokens[:q] == tokens[:q]:
                        self._touch(snap)
                        self.stats.hits += 1
                        self.stats.tokens_reused += q
                        return Hit(snap, q, snap.hidden.get(q - 1))
        return None

    @torch.no_grad()
    def restore(self, hit: Hit, slot: int):
        """Write a hit's state into `slot` (whose old rows are overwritten; entries past the prefix stay, masked by
        position like any slot's)."""
        snap = hit.snapshot
        for ring, row in zip(self.rings, snap.rings):
            ring[slot].copy_(row)
        chain = snap.chain()
        for k, (buf, m) in enumerate(self.entry_buffers):
            upper = snap.committed // m
            for node in chain:  # newest first: each older snapshot fills in below the start of the newer one
                lo = min(node.base // m, upper)
                if upper > lo:
                    buf[slot, lo:upper].copy_(node.entries[k][: upper - lo])
                upper = lo
                if upper == 0:
                    break

    @torch.no_grad()
    def save(self, slot: int, tokens: Sequence[int], committed: int, mtp_done: int | None,
             hidden: dict[int, torch.Tensor], parent: Snapshot | None, base: int) -> Snapshot | None:
        """Keep `slot`'s state after `committed` positions of `tokens` (parent: the snapshot the slot's sequence
        continued from, at `base`). -> the new snapshot, or None when an equal one exists or it would not fit."""
        tokens = array("l", tokens[:committed])
        for snap in self.snapshots.get(committed, []):
            if snap.mtp_done == mtp_done and snap.tokens == tokens:
                self._touch(snap)
                return None
        rings = [ring[slot].clone() for ring in self.rings]
        entries = [buf[slot, base // m: committed // m].clone() for buf, m in self.entry_buffers]
        hidden = {p: h.detach().clone() for p, h in hidden.items()}
        snap = Snapshot(tokens, committed, mtp_done, base, parent, rings, entries, hidden)
        snap.nbytes = sum(t.numel() * t.element_size() for t in [*rings, *entries, *hidden.values()])
        snap.nbytes += tokens.itemsize * len(tokens)
        if snap.nbytes > self.budget:
            return None
        if parent is not None:
            parent.refs += 1
        self.snapshots.setdefault(committed, []).append(snap)
        self.nbytes += snap.nbytes
        self.stats.saved += 1
        self._touch(snap)
        self._evict()  # (the new snapshot goes too if nothing else can)
        return snap if snap in self.snapshots.get(committed, ()) else None

    # --- a request's side (dsv4.engine.engine) ---
    def seed(self, r: "Request") -> int:
        """Start a request that holds a slot but has run nothing yet from the snapshot of the longest prefix of its
        prompt, if any. The engine asks when the request takes its slot, and again before each step while it waits
        for its first slice if snapshots were saved since (a prompt admitted with another that shares its start,
        e.g. n choices of one prompt, then continues from the other's first chunks). -> the prompt tokens restored."""
        if r.twin is not None or r.guides is not None or r.pos or r.sought == self.stats.saved:
            return 0  # (guided pairs: always from scratch)
        again, r.sought = r.sought >= 0, self.stats.saved
        hit = self.lookup(r.prompt, again)
        if hit is None:
            return 0
        self.restore(hit, r.slot)
        r.pos = r.written = r.cached = r.snapshot_at = hit.position
        r.mtp_rows = [hit.hidden] if self.speculative else []
        r.snapshot = hit.snapshot
        self.hold(r.snapshot)
        return hit.position

    def keep(self, r: "Request", tokens: Sequence[int], streams: dict[int, torch.Tensor]):
        """Save r's state (its `written` positions of `tokens`; streams: the main model's by position, for the MTP
        module); r's later snapshots build on it."""
        if r.twin is not None or r.guides is not None or r.slot is None:
            return
        mtp_done = r.pos - len(r.mtp_rows) if self.speculative else None
        snap = self.save(r.slot, tokens, r.written, mtp_done, streams, r.snapshot, r.snapshot_at)
        if snap is not None:
            self.hold(snap)
            self.release(r.snapshot)
            r.snapshot, r.snapshot_at = snap, snap.committed

    def hold(self, snap: Snapshot | None):
        """A running request builds on `snap` (its later snapshots will need its entries)."""
        if snap is not None:
            snap.refs += 1

    def release(self, snap: Snapshot | None):
        if snap is not None:
            snap.refs -= 1
            self._evict()

    def _touch(self, snap: Snapshot):
        tick = next(self._clock)
        for node in snap.chain():
            node.used = tick

    def _evict(self):
        while self.nbytes > self.budget:
            free = [s for v in self.snapshots.values() for s in v if s.refs == 0]
            if not free:
                return
            victim = min(free, key=lambda s: s.used)
            self.snapshots[victim.committed].remove(victim)
            if not self.snapshots[victim.committed]:
                del self.snapshots[victim.committed]
            self.nbytes -= victim.nbytes
            self.stats.evicted += 1
            if victim.parent is not None:
                victim.parent.refs -= 1
