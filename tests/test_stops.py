"""Stop strings over any split of the text into deltas."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.engine.stops import StopMatcher

ALPHABET = "ab\n日"


@settings(max_examples=300)
@given(st.text(ALPHABET, max_size=30), st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3), st.data())
def test_output_ends_before_the_first_stop_whatever_the_split(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    m = StopMatcher(stops)
    shown, seen = [], ""
    for d in deltas:
        shown.append(m.push(d))
        seen += shown[-1]
        assert not any(s in seen for s in stops)  # a stop string is never shown, not even in part and later
    shown.append(m.flush())
    ends = [e for e in range(1, len(text) + 1) if any(text[:e].endswith(s) for s in stops)]
    if ends:  # generation one character at a time stops at the first end of a stop string, cut before the longest
        e = ends[0]
        want = text[:e - max(len(s) for s in stops if text[:e].endswith(s))]
    else:
        want = text
    assert "".join(shown) == want
    assert m.stopped == bool(ends)


def test_a_possible_prefix_waits_for_the_next_delta():
    m = StopMatcher(["\n\ndef"])
    assert m.push("return x\n") == "return x"
    assert m.push("\nde") == ""
    assert m.push("bug") == "\n\ndebug"
    assert m.push("\n\ndef f") == "" and m.stopped and m.push("more") == ""


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["x", ""])
