"""Tokenizer: lossless round trip (property tests), special tokens never leak from plain text, chat mask, streaming."""

import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.tokenizers.text import ASSISTANT, BOS, EOS, NUMBER_GROUPS, USER, Tokenizer, special_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text() for f in ("textwrap.py", "bisect.py", "colorsys.py")]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(texts + ["héllo wörld 日本語 😀"], vocab_size=512, path=path, n_vis=8)
    return Tokenizer.from_file(path)  # exercise save + load


def test_vocab_and_specials(tok):
    assert tok.vocab_size == 512
    assert tok.bos_id == tok.token_id(BOS) and tok.eos_id == tok.token_id(EOS)
    assert len(tok.special_ids) == len(special_tokens(8))
    assert "<｜vis_7｜>" in tok.decode(tok.special_ids)
    assert len(tok.encode("def return self")) < len("def return self")  # BPE actually merged something


@settings(max_examples=200)
@given(st.integers(0, 10 ** 30), st.sampled_from(["", " ", "key ", "x=", "(", "\n"]),
       st.sampled_from(["", ".", " is", "a0"]))
def test_numbers_split_in_groups_of_three(tok, n, before, after):
    """DeepSeek's pre-tokenization: a number is cut into groups of <= 3 digits from the left, and no token crosses
    a group's edge or joins a digit to a letter or a space, whatever the trained merges (a small vocabulary may
    still spell a group in several tokens)."""
    text = f"{before}{n}{after}"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(p.isdigit() for p in digits), pieces
    assert "".join(digits).startswith(str(n)), pieces
    edges = {sum(map(len, digits[:k])) for k in range(len(digits) + 1)}
    assert set(range(0, len(str(n)), 3)) <= edges, pieces


def test_digit_groups_are_tokens_when_the_vocabulary_has_room(tok):
    root = Path(sysconfig.get_paths()["stdlib"])
    big = Tokenizer.train([(root / f).read_text() for f in ("textwrap.py", "bisect.py")], vocab_size=6000, n_vis=8)
    assert [g for g in NUMBER_GROUPS if len(big.encode(g)) != 1] == []
    for key in (10000, 48213, 99999):  # a pass key: always " ", its first three digits, its last two, "."
        assert [big.decode([i]) for i in big.encode(f" {key}.")] == [" ", str(key)[:3], str(key)[3:], "."]
    assert any(len(tok.encode(g)) > 1 for g in NUMBER_GROUPS)  # 512 tokens leave no room: whatever BPE merged
    assert len(big.encode("def return self")) < len("def return self")  # text still gets its merges


@settings(max_examples=200)
@given(st.text())
def test_roundtrip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100)
@given(st.binary())
def test_roundtrip_bytes(tok, data):
    for text in (data.decode("utf-8", "surrogateescape"), data.decode("latin-1")):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(data.decode("utf-8", "surrogateescape"))).encode("utf-8", "surrogateescape") == data


@settings(max_examples=100)
@given(st.lists(st.sampled_from(special_tokens(8) + ["a", " ", "<", "｜", "x\n"]), max_size=12).map("".join))
def test_plain_text_never_yields_special_ids(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids)
    assert tok.decode(ids) == text


def test_allow_special(tok):
    ids = tok.encode(f"{USER}hi{ASSISTANT}", allow_special=True)
    assert ids[0] == tok.token_id(USER) and ids[-1] == tok.token_id(ASSISTANT)


def test_chat_template_format(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert tok.chat_template(msgs) == f"{BOS}S{USER}Q1{ASSISTANT}A1{EOS}{USER}Q2{ASSISTANT}"
    assert tok.chat_template(msgs, thinking=True).endswith(f"{ASSISTANT}<think>\n")
    assert tok.chat_template(msgs, add_generation_prompt=False).endswith(f"{USER}Q2")


def test_chat_mask_covers_exactly_the_answers(tok):
    msgs = [{"role": "user", "content": f"Write {EOS} code"}, {"role": "assistant", "content": "def f():\n    pass"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "x = 1"}]
    ids, mask = tok.encode_chat(msgs)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.chat_template(msgs, add_generation_prompt=False)
    # the masked tokens, read back, are the two answers each followed by eos, and nothing else
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == [f"def f():\n    pass{EOS}", f"x = 1{EOS}"]
    assert ids.count(tok.eos_id) == 2  # the eos spelled inside the user text stayed text


@settings(max_examples=150)
@given(st.binary(max_size=40), st.text(max_size=20), st.data())
def test_stream_deltas_never_split_a_character(tok, raw, text, data):
    """Any ids (including ones whose bytes are not UTF-8 and special tokens), fed in any grouping: the deltas add up
    to decode(ids); with errors="replace" each delta is valid UTF-8 and holds no partial character."""
    ids = tok.encode(raw.decode("utf-8", "surrogateescape")) + tok.encode(text)
    ids = data.draw(st.permutations(ids)) + data.draw(st.lists(st.sampled_from(tok.special_ids), max_size=2))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    groups = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    exact, safe = tok.stream(), tok.stream(errors="replace")
    deltas = [exact.push(g) for g in groups] + [exact.flush()]
    assert "".join(deltas) == tok.decode(ids)
    safe_deltas = [safe.push(g) for g in groups] + [safe.flush()]
    for d in safe_deltas:
        d.encode("utf-8")  # raises on a lone surrogate, i.e. on half a character
    want, run = [], []  # specials end a byte run: each run is decoded on its own
    for i in [*ids, None]:
        if i is None or i in tok.special_ids:
            want.append(tok.decode(run).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            want.append(tok.decode([i]) if i is not None else "")
            run = []
        else:
            run.append(i)
    assert "".join(safe_deltas) == "".join(want)


def test_stream_holds_back_half_a_character(tok):
    ids = tok.encode("日")
    by_byte = [tok.byte_ids[b] for b in "日".encode()]
    stream = tok.stream()
    assert [stream.push(i) for i in by_byte] == ["", "", "日"] and stream.flush() == ""
    assert tok.stream().push(ids) == "日"
