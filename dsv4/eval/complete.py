"""Batched text completion by recomputing the whole forward for every new token: no cache, so it is slow (a token
costs a forward over the full context) but exact and simple. Evaluation uses it until the inference engine lands.

Prompts of different lengths share a batch right-padded: attention is causal, so the logits at a row's last real
position never see the padding after it. Rows leave the batch as soon as they finish (eos, stop string, budget).
"""

from collections.abc import Sequence

import torch


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str | list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, stops: Sequence[str] = (),
             batch_size: int = 16, progress=None) -> list[str]:
    """The continuation (text after the prompt) of each prompt, cut before the first stop string.
    A prompt is text (encoded without special tokens) or token ids (e.g. a rendered chat template).
    Greedy when temperature is 0; `progress` is an optional callable given the number of finished prompts."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.args.max_seq_len
    encoded = [list(p) if not isinstance(p, str) else tokenizer.encode(p) for p in prompts]
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    results = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        lengths = [len(encoded[i]) for i in rows]
        if min(lengths) == 0:
            raise ValueError("cannot complete an empty prompt")
        width = min(max(lengths) + max_new_tokens, limit)
        if max(lengths) >= limit:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in max_seq_len {limit}")
        buf = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            buf[r, :lengths[r]] = torch.tensor(encoded[i])
        new: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))
        while active:
            L = max(lengths[r] for r in active)
            logits = model(buf[active, :L].to(device))
            last = logits[torch.arange(len(active)), torch.tensor([lengths[r] - 1 for r in active])]
            picked = _next_tokens(last, temperature, top_k, generator).tolist()
            still = []
            for r, tok in zip(active, picked):
                new[r].append(tok)
                text = tokenizer.decode(new[r])
                cut = min((j for j in (text.find(s) for s in stops) if j >= 0), default=-1)
                if tok == tokenizer.eos_id or cut >= 0 or len(new[r]) >= max_new_tokens or lengths[r] + 1 >= width:
                    if tok == tokenizer.eos_id:
                        text = tokenizer.decode(new[r][:-1])
                    results[rows[r]] = text[:cut] if cut >= 0 else text
                    if progress is not None:
                        progress(1)
                    continue
                buf[r, lengths[r]] = tok
                lengths[r] += 1
                still.append(r)
            active = still
    return results
