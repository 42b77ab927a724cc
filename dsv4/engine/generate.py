"""`dsv4 generate`: continue one prompt (plain text, no chat template) and stream the text to stdout as it is
generated; a summary (tokens, speed, MTP acceptance, why it stopped) goes to stderr.

    text = generate("runs/small/final", "def fib(n):", max_new_tokens=64)

The prompt is given as text or read from a file (long prompts: up to the model's context, prefilled in chunks with a
progress bar); `context_dir` puts a whole source tree before it (dsv4.data.context), in what the context leaves.
"""

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dsv4.engine.engine import Engine
from dsv4.engine.load import context_len, load_engine, load_model
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.terminal import PrefillBar, pack_context, report_speed

MIN_CACHE_LEN = 4096  # tokens the cache holds at least (see `generate`)


def read_prompt(prompt: str | None, prompt_file: str | os.PathLike | None, context_dir: str | None) -> str:
    """The prompt text: `prompt`, or the contents of `prompt_file`, or "" when only a context_dir is given."""
    if prompt is not None and prompt_file is not None:
        raise ValueError("give a prompt or --prompt-file, not both")
    if prompt is None and prompt_file is None and not context_dir:
        raise ValueError("give a prompt, --prompt-file or --context-dir")
    if prompt is not None:
        return prompt
    return Path(prompt_file).read_text() if prompt_file is not None else ""


def stream_to_stdout(engine: Engine, ids: list[int], params: SamplingParams, max_new_tokens: int,
                     stop: Sequence[str]) -> str:
    """Generate after `ids`, writing the text as it comes; the speed report goes to stderr -> the text."""
    t0, first, last, text = time.perf_counter(), None, None, []
    for last in engine.stream(ids, params, progress=PrefillBar(), max_new_tokens=max_new_tokens, stop=stop):
        if first is None:
            first = time.perf_counter()
        text.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(report_speed(engine.stats, t0, first, last.finish_reason if last is not None else None), file=sys.stderr)
    return "".join(text)


def generate(ckpt: str | os.PathLike, prompt: str | None = None, *, prompt_file: str | os.PathLike | None = None,
             context_dir: str | None = None, params: SamplingParams | None = None, max_new_tokens: int = 256,
             stop: Sequence[str] = (), max_len: int | None = None, device: str | None = None, dtype: str = "auto",
             compile: bool | str = False, speculative: bool | None = None, device_map=None,
             prefix_cache_gb: float = 0.0) -> str:
    """Continue the prompt with the checkpoint's model -> the generated text (also streamed to stdout). The engine's
    cache holds prompt + max_new_tokens rounded up to a power of two >= MIN_CACHE_LEN (max_len: that many tokens
    instead; the packed tree fills up to it).
    device_map: see dsv4.engine.load.load_model ("auto" plans for max_len, else the model's context)."""
    text = read_prompt(prompt, prompt_file, context_dir)
    model, tok = load_model(ckpt, device, dtype, device_map=device_map, max_len=max_len)
    ids = tok.encode(text)
    if context_dir:
        budget = context_len(model, max_len) - len(ids) - max_new_tokens
        ids = pack_context(context_dir, tok, budget).ids + ids
    if not ids:
        raise ValueError("the prompt is empty (and --context-dir packed nothing)")
    # (the cache's length rounded up to a power of two: compiled steps specialise on the cache's shapes, so runs
    # with other prompt lengths reuse the graphs cached on disk instead of compiling anew)
    cache_len = max_len or max(MIN_CACHE_LEN, 1 << (len(ids) + max_new_tokens - 1).bit_length())
    engine = load_engine(model, tok, max_len=cache_len, compile=compile, speculative=speculative,
                         prefix_cache_gb=prefix_cache_gb)
    return stream_to_stdout(engine, ids, params or SamplingParams(temperature=0.0), max_new_tokens, stop)
