"""Per-request sampling over a batch of next-token logits, vectorised across rows (each row has its own settings).

    penalties   logits of tokens seen so far: repetition (divide positive / multiply negative by r, as CTRL and
                vLLM), then presence (- p once seen) and frequency (- f * count), as OpenAI's API
    temperature logits / T;  T == 0 means greedy (argmax of the penalised logits)
    filters     top-k (keep the k best), top-p (keep the smallest most-probable set whose mass reaches p),
                min-p (keep tokens with prob >= min_p * the best prob); removed tokens get -inf
    draw        one categorical sample per row from its own torch.Generator (seeded requests are reproducible
                whatever else is in the batch)
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"), ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The request's own random stream: seeded if it has a seed, else None (torch's global generator)."""
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


def _column(params: list[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=like.dtype, device=like.device)[:, None]


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] (fp32), counts [B, V] how often each token occurred so far -> penalised logits."""
    rep = _column(params, "repetition_penalty", logits)
    seen = counts > 0
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    out = out - _column(params, "presence_penalty", logits) * seen
    return out - _column(params, "frequency_penalty", logits) * counts.to(logits.dtype)


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits [B, V] -> the same with the tokens top-k / top-p / min-p remove set to -inf."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.tensor([min(p.top_k or V, V) for p in params], device=logits.device)[:, None]  # (k > V: all)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of the better tokens: keep while it is below top_p
    drop = (rank >= k) | (mass_before >= _column(params, "top_p", logits))
    drop |= probs < _column(params, "min_p", logits) * probs[:, :1]
    drop[:, 0] = False  # the best token always stays
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. Rows with temperature 0 take the argmax."""
    logits = logits.float()
    if counts is not None:
        logits = apply_penalties(logits, counts, params)
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):  # nothing to draw: skip the sort of the filters
        return greedy
    probs = probabilities(logits, params)
    drawn = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
    return torch.where(_column(params, "temperature", logits)[:, 0] == 0, greedy, drawn)


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from: soft-max of the temperature-scaled, filtered logits [B, V]."""
    temperature = _column(params, "temperature", logits)
    return filter_logits(logits / temperature.clamp(min=1e-6), params).softmax(-1)


def speculative_verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) for one drafted token per
    row: p [B, V] the target distribution, q [B, V] the one the draft [B] was drawn from. Accept with probability
    min(1, p(d) / q(d)); otherwise draw from max(0, p - q) renormalised. The kept token is then distributed exactly
    as p. -> (accepted [B] bool, token [B]: the draft where accepted, the replacement elsewhere)."""
    rows = torch.arange(p.shape[0], device=p.device)
    u = torch.stack([torch.rand((), generator=g, device=p.device) for g in generators])
    accepted = u * q[rows, drafts] <= p[rows, drafts]
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected anyway
    replaced = torch.stack([torch.multinomial(r, 1, generator=g)[0] for r, g in zip(residual, generators)])
    return accepted, torch.where(accepted, drafts, replaced)


def draft_tokens(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], torch.Tensor | None]:
    """MTP drafts from the draft head's penalised logits [B, V] -> (one token per row, the distribution q [B, V]
    each sampled row drew it from; None when every row is greedy, whose draft is the argmax)."""
    if all(p.temperature == 0 for p in params):
        return logits.argmax(-1).tolist(), None
    q = probabilities(logits, params)
    greedy = logits.argmax(-1)
    drawn = torch.stack([torch.multinomial(row, 1, generator=g)[0] for row, g in zip(q, generators)])
    temp0 = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    return torch.where(temp0, greedy, drawn).tolist(), q


def verify_drafts(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> tuple[list[bool], list[int]]:
    """Keep each row's draft or replace it, given the main model's penalised logits [B, V] at the draft's place ->
    (accepted per row, the token to emit there). Greedy rows accept iff the draft is the argmax (which replaces it);
    sampled rows follow speculative_verify."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    if q is None:  # every row greedy
        return (greedy == torch.tensor(drafts, device=greedy.device)).tolist(), greedy.tolist()
    d = torch.tensor(drafts, device=logits.device)
    accepted, token = speculative_verify(probabilities(logits, params), q, d, generators)
    temp0 = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    return torch.where(temp0, greedy == d, accepted).tolist(), torch.where(temp0, greedy, token).tolist()
