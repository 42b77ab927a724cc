"""What one engine step may cost, and how much prefill fits in it beside the running sequences' decode tokens.

A running stream waits for every step, so a step's cost is the pause a long prompt arriving adds to it. The engine
gives each step a budget (what a prompt's first `max_step_tokens` positions cost) and fills what its decode tokens
leave with slices of pending prompts (in arrival order), each sized by the cost model:

    position(c) = dense + attention(c)     multiply-adds of one position after c positions of context: the active
                                           parameters (dsv4.weights.info.count_params) and the attention's and the
                                           indexer's per-token work at c (dsv4.weights.info.attention_flops)
    slice(n, c) = n position(c + n / 2)    n positions from context c (the attention part grows linearly with c)

Attention's share grows with the context (a CSA layer's indexer scores every compressed entry; an HCA layer attends to
all of them), so a slice at 100K of context is a fraction of one at 1K. However full the step, the oldest prompt
runs at least `MIN_SLICE` positions (or max_step_tokens, if fewer), so a prompt is never starved by a large batch.
"""

from dsv4.config import ModelArgs
from dsv4.weights.info import attention_flops, count_params, meta_model


class StepBudget:
    MIN_SLICE = 16

    def __init__(self, args: ModelArgs, max_step_tokens: int, speculative: bool):
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        parts = count_params(meta_model(args))
        counted = [parts["main"], parts["engram"]] + ([parts["mtp"]] if speculative else [])
        self.args, self.max_step_tokens = args, max_step_tokens
        self.dense = sum(c.flops for part in counted for c in part.values())
        self.layers = range(args.n_layers + (args.n_mtp_layers if speculative else 0))
        self.total = self.slice(max_step_tokens, 0)  # a prompt's first max_step_tokens positions

    def position(self, context: int) -> float:
        """FLOPs of one position after `context` positions."""
        return self.dense + sum(attention_flops(self.args, self.layers, context).values())

    def slice(self, n: int, context: int) -> float:
        return n * self.position(context + n // 2)

    def fit(self, left: float, context: int, most: int) -> int:
        """The longest slice (at most `most` positions) from `context` that costs at most `left` FLOPs."""
        lo, hi = 0, most  # slice() grows with n: the largest n with slice(n) <= left
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.slice(mid, context) <= left:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def plan(self, decode_contexts: list[int], prompts: list[tuple[int, int]], width: int = 1) -> list[int]:
        """How many positions of each pending prompt (context so far, positions left, in arrival order) run this
        step beside decode rows at `decode_contexts` (each `width` positions: 2 when verifying a draft)."""
        left = self.total - sum(self.slice(width, c) for c in decode_contexts)
        sizes = []
        for context, remaining in prompts:
            n = self.fit(left, context, remaining)
            least = min(self.MIN_SLICE, self.max_step_tokens, remaining)
            if not sizes and n < least:  # the oldest prompt always moves
                n = least
            sizes.append(n)
            left -= self.slice(n, context)
        return sizes
