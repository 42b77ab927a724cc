"""dsv4.eval.syntax: signatures drawn from held-out sources, bodies cut where they end, and the share that parses."""

import pytest

from dsv4.eval.syntax import body, score, signatures

SOURCE = '''
import os


def top(a, b=1):
    """doc"""
    return a + b


class Box:
    def area(self,
             scale: float = 1.0) -> float:
        return 2.0 * scale

    async def fetch(self): return None

    @property
    def size(self):
        return 3
'''


def test_signatures_are_the_def_lines_dedented():
    sigs = signatures([SOURCE, "def broken(:\n"], limit=10)
    assert sorted(sigs) == sorted(["def top(a, b=1):", "def area(self,\n         scale: float = 1.0) -> float:",
                                   "def size(self):"])  # one-line bodies and unparsable sources are left out
    assert signatures([SOURCE], limit=2, seed=1) == signatures([SOURCE], limit=2, seed=1)
    assert len(signatures([SOURCE], limit=2)) == 2


@pytest.mark.parametrize("completion, expected", [
    ("\n    return 1\n\ndef other():\n    pass", "\n    return 1\n"),      # ends at the next top-level line
    ("\n    x = 1\n    if x:\n        y = 2\nclass A:", "\n    x = 1\n    if x:\n        y = 2"),
    ("\n    return 1\n    # still inside", None),                          # the budget ran out inside the body
    ("\nreturn 1\n", None),                                                # no indented body at all
    ("  # comment\n\n    pass\n\nprint()", "  # comment\n\n    pass\n"),   # the def line's rest is not the body
])
def test_body_ends_at_the_first_line_at_column_zero(completion, expected):
    assert body(completion) == expected


def test_score_counts_ended_and_parsing_bodies():
    prompts = ["def f(x):", "def g(x):", "def h(x):", "def k(x):"]
    completions = ["\n    return x + 1\n\nx = 2",          # ends, parses
                   "\n    return x +\n\nx = 2",            # ends, does not parse
                   "\n    return x",                       # does not end
                   "\n    if x:\n    return x\n\ny = 1"]   # ends, bad indentation
    r = score(prompts, completions)
    assert (r["parsed"], r["ended"], r["signatures"]) == (1, 3, 4) and r["share"] == 0.25
    assert [c["parses"] for c in r["cases"]] == [True, False, False, False]
    with pytest.raises(ValueError):
        score(prompts, completions[:2])
