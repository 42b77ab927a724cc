"""MTP speculation (speculative=True, a model with an MTP module): each step the MTP module drafts one token from the
last position's streams, the main model runs the pending token and the draft in one step of width 2, and the draft
is kept iff the main model would have produced it (greedy: the argmax; sampling: the standard rule, accept with
probability min(1, p/q), else draw from max(0, p - q)), so the output distribution is the plain one's.
A rejected draft's position is run again by the next step (see dsv4.model.cache on why its writes are harmless).

`Speculation` is the part of `Engine` (dsv4.engine.engine) that runs the MTP module: over prefill chunks, as the
draft step, and the draft + verify round that replaces a plain decode step.
"""

import torch

from dsv4.engine.request import Delta, Request
from dsv4.engine.sampling import draft_tokens, verify_drafts
from dsv4.model.cache import KVCache, Step


class Speculation:
    def _draft_logits(self, h: torch.Tensor, ids: torch.Tensor, cache: KVCache, step: Step,
                      last: torch.Tensor) -> torch.Tensor:
        """The MTP module over a step -> its logits [B, V] at each row's column `last`."""
        model = self.model
        hm = model.mtp_step(h, ids, cache, step)
        hm = hm[torch.arange(hm.shape[0], device=hm.device), last][:, None]
        return model.logits(hm, model.mtp[0].hc_head, model.mtp[0].norm)[:, 0]

    def _speculate(self, reqs: list[Request]) -> list[Delta]:
        # 1. MTP over the positions it has not seen (1 or 2 per row; their next tokens are known) -> a draft
        width = 2 if self.compile else max(len(r.mtp_rows) for r in reqs)  # compiled: one shape
        nxt = [self._next_tokens(r, len(r.mtp_rows)) for r in reqs]
        h_in = torch.stack([torch.stack(r.mtp_rows + [r.mtp_rows[-1]] * (width - len(r.mtp_rows))) for r in reqs])
        ids, step = self._rows(reqs, nxt, [len(n) for n in nxt], width, [r.pos - len(r.mtp_rows) for r in reqs])
        last = torch.tensor([len(r.mtp_rows) - 1 for r in reqs], device=self.device)
        draft_logits = self._compiled(self._draft_step, h_in, ids, self.cache, step, last).float()
        params, generators = [r.params for r in reqs], [r.generator for r in reqs]
        drafts, q = draft_tokens(self._penalised(reqs, draft_logits), params, generators)
        # 2. the main model runs pending + draft
        ids, step = self._rows(reqs, [[r.pending, d] for r, d in zip(reqs, drafts)], [2] * len(reqs))
        # both columns are committed: a rejected draft's position is simply run again by the next step, which
        # rewrites everything it wrote before anything reads it (see dsv4.model.cache)
        h, logits = self._compiled(self._decode_step, ids, self.cache, step)
        logits = logits.float()  # [B, 2, V]
        accept, first = verify_drafts(self._penalised(reqs, logits[:, 0]), drafts, q, params, generators)
        held = [i for i, r in enumerate(reqs) if r.processor is not None and not r.processor.done]
        if held:  # a constrained row keeps no draft: its token comes from its masked logits, as a plain decode's
            for i, t in zip(held, self._sample([reqs[i] for i in held], logits[held, 0])):
                accept[i], first[i] = False, t
        bonus = [None] * len(reqs)
        ok = [i for i, a in enumerate(accept) if a]
        if ok:  # the accepted rows' next token, sampled as the plain decode would (the draft now counts as seen)
            for i, t in zip(ok, self._sample([reqs[i] for i in ok], logits[ok, 1], extra=[drafts[i] for i in ok])):
                bonus[i] = t
        tokens, kept = [], []
        self.stats["drafted"] += len(reqs)
        self.stats["accepted"] += sum(accept)
        for i, r in enumerate(reqs):
            if accept[i]:
                tokens.append([drafts[i], bonus[i]])
                r.mtp_rows = [h[i, 0], h[i, 1]]
            else:
                tokens.append([first[i]])
                r.mtp_rows = [h[i, 0]]
            kept.append(2 if accept[i] else 1)
        for r, k in zip(reqs, kept):
            r.written = r.pos + 2  # a rejected draft's position is written too
            r.pos += k
        self.stats["decode_tokens"] += sum(kept)
        return self._emit(reqs, tokens, logits)

    def _next_tokens(self, r: Request, n: int) -> list[int]:
        """The n tokens that follow the positions in r.mtp_rows (the last of them is the pending token)."""
        known = r.prompt + r.output
        return known[r.pos - n + 1: r.pos + 1]

    def _prefill_mtp(self, reqs: list[Request], chunks: list[list[int]], h: torch.Tensor
                     ) -> list[dict[int, torch.Tensor]]:
        """The MTP module over a prefill step: it runs position t once token t + 1 is known, so all of a chunk but a
        prompt's last position, from the position before the chunk where a restored prefix left it one behind.
        -> each row's last two streams by position (what its snapshots keep)."""
        h_in, nxt, start, streams = [], [], [], []
        for i, (r, c) in enumerate(zip(reqs, chunks)):
            rows = torch.cat([torch.stack(r.mtp_rows), h[i, :len(c)]]) if r.mtp_rows else h[i, :len(c)]
            start.append(r.pos - len(r.mtp_rows))
            nxt.append(r.prompt[start[-1] + 1: r.pos + len(c) + 1])
            h_in.append(rows)
            r.mtp_rows = [rows[len(nxt[-1])]] if len(nxt[-1]) < len(rows) else []  # a prompt's last position
            streams.append({start[-1] + j: rows[j] for j in range(max(len(rows) - 2, 0), len(rows))})
        width = max(len(x) for x in h_in)
        h_in = torch.stack([torch.cat([x, x.new_zeros(width - len(x), *x.shape[1:])]) for x in h_in])
        ids_next, mstep = self._rows(reqs, nxt, [len(n) for n in nxt], width, start)
        self.model.mtp_step(h_in, ids_next, self.cache, mstep)
        return streams
