"""Batched text completion for evaluation, through the inference engine (cached, continuously batched decoding)."""

from collections.abc import Callable, Sequence

from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams


def complete(model, tokenizer, prompts: Sequence[str | list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, stops: Sequence[str] = (),
             batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[str]:
    """The continuation (text after the prompt) of each prompt, cut before the first stop string or end of sentence.
    A prompt is text (encoded without special tokens) or token ids (e.g. a rendered chat template).
    Greedy when temperature is 0; prompt i samples with seed `seed + i`. `progress` is an optional callable given the
    number of newly finished prompts."""
    if not prompts:
        return []
    longest = max(len(p) if not isinstance(p, str) else len(tokenizer.encode(p)) for p in prompts)
    max_len = min(longest + max_new_tokens, model.args.max_seq_len)
    engine = Engine(model, tokenizer, max_batch=min(batch_size, len(prompts)), max_len=max_len)
    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=seed + i) for i in range(len(prompts))]
    done = engine.generate(prompts, params, progress=progress, max_new_tokens=max_new_tokens, stop=tuple(stops))
    return [c.text for c in done]
