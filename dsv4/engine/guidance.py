"""Classifier-free guidance in the engine: a guided request runs as two rows of the batch, its own (the conditional
prompt) and a hidden twin (the unconditional one, e.g. BOS BOI without the caption), and samples each token once from

    logits = u + s (c - u)          c: its own row's logits, u: the twin's, s: the guidance scale

both rows then take that token. The two rows are admitted together (two cache slots) and may finish their prefills
in different steps: the row that finishes first holds its last logits until the other's arrive. The twin never
samples, streams or ends on its own; it is released with its request. s = 1 is the plain conditional distribution,
s = 0 the unconditional one.
"""

from __future__ import annotations

import torch

from dsv4.engine.request import Request


def guided_rows(reqs: list[Request], logits: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
    """This step's rows and their logits [B, V] -> the requests that sample now and the logits they sample from
    [n, V]: a plain request its own row; a guided one the combination, once both of its rows have logits (this
    step's or held from an earlier one). A row whose partner has none yet holds its own and waits."""
    here = {id(r): i for i, r in enumerate(reqs)}
    out: list[tuple[Request, torch.Tensor]] = []
    for i, r in enumerate(reqs):
        if r.guides is not None:  # a twin: its request samples, now if it is here or holds logits, else later
            main = r.guides
            if id(main) in here:
                continue
            if main.held is not None:
                out.append((main, _combine(main.held, logits[i], main)))
                main.held = None
            else:
                r.held = logits[i]
            continue
        if r.twin is None:
            out.append((r, logits[i]))
            continue
        j = here.get(id(r.twin))
        u = logits[j] if j is not None else r.twin.held
        if u is None:
            r.held = logits[i]
            continue
        r.twin.held = None
        out.append((r, _combine(logits[i], u, r)))
    if not out:
        return [], logits[:0]
    return [r for r, _ in out], torch.stack([x for _, x in out])


def _combine(c: torch.Tensor, u: torch.Tensor, r: Request) -> torch.Tensor:
    """u + s (c - u), computed from the nearer end (torch.lerp): exactly c at s = 1 and u at s = 0."""
    return torch.lerp(u.float(), c.float(), r.guide_scale)


def follow(reqs: list[Request], tokens: list[int]) -> None:
    """Each guided request's twin takes the token its request sampled (it runs it at the next step)."""
    for r, t in zip(reqs, tokens):
        if r.twin is not None:
            r.twin.pending = t
            r.twin.output.append(t)
