"""Does the model write Python? Greedy completions of held-out function signatures, cut where the body ends, checked
with `ast.parse`.

    signature:   def area(self, scale: float = 1.0) -> float:        (the def line(s) of a held-out function)
    completion:  "\n        return self.w * self.h * scale\n\n    def ..."
    body:        the completion up to the first non-empty line at or left of the def's own indentation
    score:       share of signatures whose body ended within the token budget and whose def + body parses

Only the signature is given (no docstring, no decorators), dedented to column 0, so the body ends at the first
non-empty line that starts at column 0.
"""

import ast
import random
import textwrap
from collections.abc import Iterable


def signatures(sources: Iterable[str], limit: int = 32, seed: int = 0, max_chars: int = 200) -> list[str]:
    """Up to `limit` function signatures (def line(s), dedented, without the trailing newline) from the Python
    `sources`, drawn with `seed` from all functions and methods whose body starts on a line of its own."""
    found = []
    for source in sources:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.body[0].lineno > node.lineno:
                sig = textwrap.dedent("\n".join(lines[node.lineno - 1:node.body[0].lineno - 1])).rstrip()
                if sig.endswith(":") and len(sig) <= max_chars:
                    found.append(sig)
    random.Random(seed).shuffle(found)
    return found[:limit]


def body(completion: str) -> str | None:
    """The completion up to where the function's body ends (the first non-empty line at column 0 after at least one
    indented line), or None when the body has not ended within the completion."""
    lines = completion.split("\n")
    seen_body = False
    for i, line in enumerate(lines[1:], start=1):  # lines[0] is the rest of the def line (usually empty)
        if not line.strip():
            continue
        if line[0] in " \t":
            seen_body = True
        elif seen_body:
            return "\n".join(lines[:i])
        else:
            return None  # column 0 before any body line: no body at all
    return None


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def score(prompts: list[str], completions: list[str]) -> dict:
    """How many bodies ended and how many of those parse, with each case for the report."""
    cases = []
    for prompt, completion in zip(prompts, completions, strict=True):
        b = body(completion)
        cases.append({"signature": prompt, "ended": b is not None, "parses": b is not None and parses(prompt + b)})
    n = len(cases)
    parsed = sum(c["parses"] for c in cases)
    return {"share": parsed / n if n else float("nan"), "parsed": parsed, "ended": sum(c["ended"] for c in cases),
            "signatures": n, "cases": cases}


def syntax_check(model, tok, sources: Iterable[str], limit: int = 32, max_new_tokens: int = 128) -> dict:
    """Greedy completions of `limit` held-out signatures from `sources`, scored by `score`."""
    from dsv4.eval.complete import complete

    prompts = signatures(sources, limit)
    return score(prompts, complete(model, tok, prompts, max_new_tokens))
