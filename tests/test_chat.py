"""`dsv4 chat` (dsv4.engine.chat) over a scripted engine: commands, end of input, Ctrl-C at the prompt, the history
that forgets its oldest turns when the context is full, a message too long for the context, and the options the
command line hands over. (tests/test_engine.py runs the chat on a real checkpoint.)"""

import pytest

from dsv4.cli import main
from dsv4.engine import chat as chat_module
from dsv4.engine.chat import Conversation, chat
from dsv4.engine.request import Delta
from dsv4.engine.sampling import SamplingParams


class CharTokenizer:
    """encode_chat: 2 tokens per message (role + end) and one per character; the generation prompt is 1 token."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages, add_generation_prompt=False, thinking=False):
        ids = []
        for m in messages:
            ids += [1] + self.encode(m["content"]) + [2]
        return ids + ([3] if add_generation_prompt else []) + ([4] if thinking else []), None


class ScriptedEngine:
    """Answers every prompt with ANSWER in two deltas, and records the prompts."""
    ANSWER = ("Hi", " there")

    def __init__(self, max_len: int = 10_000):
        self.tokenizer, self.max_len, self.prompts, self.calls = CharTokenizer(), max_len, [], []

    def stream(self, ids, params, progress=None, max_new_tokens=0, stop=()):
        self.prompts.append(list(ids))
        self.calls.append(dict(params=params, max_new_tokens=max_new_tokens, stop=stop))
        yield Delta(0, self.ANSWER[0], [5])
        yield Delta(0, self.ANSWER[1], [6], finish_reason="length")


def script(*lines):
    """A `read` giving these lines, then the end of input; a KeyboardInterrupt in the list is raised there."""
    it = iter(lines)

    def read(prompt):
        assert prompt == "you> "
        line = next(it, EOFError)
        if isinstance(line, type):
            raise line()
        return line
    return read


@pytest.fixture
def engine(monkeypatch):
    engine = ScriptedEngine()
    opened = {}

    def open_engine(ckpt, system, context_dir, max_new_tokens, max_len, *load):
        opened.update(ckpt=ckpt, system=system, context_dir=context_dir, max_len=max_len, load=load)
        return engine, system
    monkeypatch.setattr(chat_module, "open_engine", open_engine)
    engine.opened = opened
    return engine


def test_conversation_forgets_the_oldest_turns_that_no_longer_fit(capsys):
    tok = CharTokenizer()
    c = Conversation(tok, system="SYS")
    first = c.ask("one", budget=100, limit=200)
    assert first == tok.encode_chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "one"}],
                                    add_generation_prompt=True)[0]
    c.answer("1111")
    c.ask("two", budget=100, limit=200)
    c.answer("2222")
    ids = c.ask("three", budget=len(first) + 14, limit=200)  # room for the system prompt, one exchange and "three"
    assert [t["content"] for t in c.turns] == ["two", "2222", "three"]
    assert ids == c.encode() and len(ids) <= len(first) + 14
    assert capsys.readouterr().err.count("the oldest turn no longer fits the context and was dropped") == 1
    c.reset()
    assert c.turns == [] and c.messages() == [{"role": "system", "content": "SYS"}]


def test_a_message_too_long_even_alone_is_refused_and_not_kept(capsys):
    c = Conversation(CharTokenizer(), thinking=True)
    c.ask("hi", 100, 200)
    c.answer("ok")
    assert c.ask("x" * 300, budget=100, limit=200) is None
    err = capsys.readouterr().err
    assert "that message is too long: 304 tokens, the context holds 200" in err  # [1] x*300 [2] [3] [4]
    assert c.turns == []  # the old exchange was forgotten making room; the long message is not kept either
    assert c.ask("fine", 100, 200) is not None and c.encode()[-1] == 4  # the thinking marker opens the answer


def test_chat_streams_answers_keeps_history_and_resets(engine, capsys):
    assert chat("ckpt-dir", read=script("hello", "  ", "again", "/reset", "fresh", "/exit", "never read")) == 0
    out, err = capsys.readouterr()
    assert out == "dsv4> Hi there\n" * 3
    assert "dsv4 chat: ckpt-dir" in err and "(history cleared)" in err
    tok = engine.tokenizer
    hello = tok.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    assert engine.prompts[0] == hello  # the blank line asked nothing
    assert engine.prompts[1] == tok.encode_chat([{"role": "user", "content": "hello"},
                                                 {"role": "assistant", "content": "Hi there"},
                                                 {"role": "user", "content": "again"}], add_generation_prompt=True)[0]
    assert engine.prompts[2] == tok.encode_chat([{"role": "user", "content": "fresh"}], add_generation_prompt=True)[0]
    assert engine.calls[0]["params"] == SamplingParams(temperature=0.7)  # the chat's default


def test_end_of_input_quits_and_ctrl_c_at_the_prompt_does_not(engine, capsys):
    assert chat("ckpt", read=script(KeyboardInterrupt, "hello")) == 0  # then EOF
    out, err = capsys.readouterr()
    assert "(/exit or Ctrl-D quits)" in err and out == "dsv4> Hi there\n"
    assert len(engine.prompts) == 1


def test_the_system_prompt_stays_through_reset(engine, capsys):
    chat("ckpt", system="be brief", thinking=True, read=script("a", "/reset", "b"))
    system = [{"role": "system", "content": "be brief"}]
    tok = engine.tokenizer
    assert engine.prompts[1] == tok.encode_chat(system + [{"role": "user", "content": "b"}],
                                                add_generation_prompt=True, thinking=True)[0]


def test_a_full_context_drops_turns_and_a_long_message_is_skipped(engine, capsys, monkeypatch):
    engine.max_len = 40
    chat("ckpt", max_new_tokens=10, read=script("aaaaaaaa", "bbbbbbbb", "c" * 50, "dddd"))
    err = capsys.readouterr().err
    assert "the oldest turn no longer fits" in err and "that message is too long" in err
    assert all(len(p) <= engine.max_len - 10 for p in engine.prompts) and len(engine.prompts) == 3
    assert engine.calls[0]["max_new_tokens"] == 10


def test_cli_chat_hands_its_options_over(monkeypatch, tmp_path):
    seen = {}

    def fake_chat(ckpt, **kw):
        seen.update(kw, ckpt=ckpt)
        return 0
    monkeypatch.setattr(chat_module, "chat", fake_chat)
    argv = ["chat", "--ckpt", str(tmp_path), "--system", "sys", "--thinking", "--temperature", "0.3", "--top-k", "5",
            "--stop", "END", "--max-new-tokens", "7", "--max-len", "512", "--compile", "--cpp-wrapper",
            "--no-speculative", "--dtype", "fp32"]
    assert main(argv) == 0
    assert seen["ckpt"] == str(tmp_path) and seen["system"] == "sys" and seen["thinking"] is True
    assert seen["params"] == SamplingParams(temperature=0.3, top_k=5)
    assert seen["stop"] == ["END"] and seen["max_new_tokens"] == 7 and seen["max_len"] == 512
    assert seen["compile"] == "max" and seen["speculative"] is False and seen["dtype"] == "fp32"
    assert seen["context_dir"] is None
