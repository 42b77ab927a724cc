"""JSON mode (dsv4.engine.json_mode): the byte recogniser accepts exactly the prefixes of JSON objects, and a request
constrained by it can only write such a prefix, and once the object is closed only the end-of-text token."""

import json
import random

import pytest
import torch

from dsv4.engine.json_mode import DONE, START, JsonVocab, advance
from dsv4.tokenizers.text import Tokenizer
from tests.test_data import FEW

BAD = ['[]', '"x"', '1', '{a:1}', '{"a":01}', '{"a":1,}', '{"a" 1}', '{"a":tru}', '{"a":1}}', '{"a":-}', '{"a":1.}',
       '{"a":"\x01"}', '{"a":"\\x"}', '{"a":"\\u12g4"}', '{,}', '{"a":[1,]}', '{"a":.5}', '{"a":1e}']


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([0, -12, 3.25, 1e-7, -0.5e12, True, False, None, "", 's"\\/', "é\n\t\u2028", "\x01"])
    if r < 0.6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_every_prefix_of_an_object_is_accepted_and_only_the_whole_is_done():
    rng = random.Random(0)
    for _ in range(300):
        doc = json.dumps({"x": random_value(rng)}, ensure_ascii=rng.random() < 0.5,
                         indent=rng.choice([None, 1, "\t"])).encode()
        assert advance(START, doc) == DONE, doc
        assert all(advance(START, doc[:k]) not in (None, DONE) for k in range(len(doc))), doc


@pytest.mark.parametrize("text", BAD)
def test_what_is_not_an_object_is_refused(text):
    state = advance(START, text.encode())
    assert state is None or state != DONE
    try:  # (and Python's parser agrees that it is no JSON object)
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    assert not isinstance(parsed, dict)


@pytest.fixture(scope="module")
def vocab():
    tok = Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)
    return tok, JsonVocab(tok)


def test_a_constrained_walk_writes_json_and_then_only_ends(vocab):
    """Random logits, masked at every step: the text is always a prefix of an object; once it is closed only the
    end-of-text token remains; the walks that close parse."""
    tok, jv = vocab
    g = torch.Generator().manual_seed(0)
    closed = 0
    for _ in range(20):
        proc = jv.processor()
        out = b""
        for _ in range(300):
            logits = torch.randn(jv.size, generator=g) * 3
            logits[[i for i, b in jv.tokens if set(b) <= set(b"{}[]")]] += 4  # (walks that close sooner)
            masked = proc.mask(logits)
            token = int(torch.multinomial(masked.softmax(-1), 1, generator=g))
            if proc.state == DONE:
                assert torch.isfinite(masked).nonzero().flatten().tolist() == [tok.eos_id]
            proc.advance(token)
            if proc.done:
                break
            out += jv.by_id[token]
            assert advance(START, out) is not None
        if proc.done:
            closed += 1
            assert isinstance(json.loads(out.decode()), dict)
    assert closed >= 5


def test_the_tokens_of_an_object_are_never_masked(vocab):
    tok, jv = vocab
    doc = '{"name": "dsv4", "sizes": [1, 2.5, -3e2], "ok": true, "none": null, "nested": {"é": "\\n"}}'
    proc = jv.processor()
    for token in tok.encode(doc):
        assert torch.isfinite(proc.mask(torch.zeros(jv.size))[token]), token
        proc.advance(token)
    assert proc.state == DONE
    proc.advance(tok.eos_id)
    assert proc.done
