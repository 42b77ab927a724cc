"""What the terminal commands (`dsv4 generate`, `dsv4 chat`) show around the engine, on stderr so that stdout holds
only the generated text: a progress bar while a long prompt is prefilled, a source tree packed into the context with
what did not fit, and the speed report."""

import os
import sys
import time

from tqdm import tqdm

from dsv4.data.context import Packed, pack_tree

MISSED_SHOWN = 20  # files that did not fit, listed by name; the rest are counted


class PrefillBar:
    """A progress bar on stderr for prompts long enough to take several prefill steps (Engine.stream's progress)."""

    def __init__(self, min_tokens: int = 4096):
        self.min_tokens, self.bar = min_tokens, None

    def __call__(self, done: int, total: int):
        if total < self.min_tokens:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def pack_context(root: str | os.PathLike, tokenizer, budget: int) -> Packed:
    """The text files under `root` packed into `budget` tokens (dsv4.data.context.pack_tree), with a progress bar
    over the files; says on stderr what went in and which files did not fit."""
    if budget <= 0:
        raise ValueError(f"--context-dir: no room left in the context ({budget} tokens) for the tree")
    with tqdm(desc=f"packing {root}", unit="file", file=sys.stderr, leave=False) as bar:
        packed = pack_tree(root, tokenizer, budget, progress=bar.update)
    print(f"[{packed.summary()} (budget {budget})]", file=sys.stderr)
    missed = [path for path, why in packed.left_out if why == "did not fit"]
    for path in missed[:MISSED_SHOWN]:
        print(f"  did not fit: {path}", file=sys.stderr)
    if len(missed) > MISSED_SHOWN:
        print(f"  ... and {len(missed) - MISSED_SHOWN} more", file=sys.stderr)
    return packed


def report_speed(stats: dict, t0: float, first: float | None, finish_reason: str | None) -> str:
    """The summary line after a generation that started at t0 and produced its first token at `first` (None: no
    token): tokens, prefill and decode time, decode speed, MTP acceptance, why it stopped."""
    elapsed = time.perf_counter() - t0
    prefill_s = (first or t0) - t0
    n = stats["decode_tokens"] + (1 if first else 0)
    decode_s = max(elapsed - prefill_s, 1e-9)
    cached = stats.get("cached_tokens", 0)
    line = (f"[{n} tokens in {elapsed:.2f} s: prefill {stats['prefill_tokens']} tokens "
            f"{f'(+{cached} from the prefix cache) ' if cached else ''}{prefill_s:.2f} s, "
            f"decode {stats['decode_tokens'] / decode_s:.1f} tokens/s")
    if stats["drafted"]:
        line += f", MTP acceptance {stats['accepted'] / stats['drafted']:.0%}"
    return line + (f"; stopped: {finish_reason}]" if finish_reason is not None else "]")
