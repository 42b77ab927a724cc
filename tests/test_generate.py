"""`dsv4 generate` (dsv4.engine.generate) over a scripted engine: where the prompt comes from and the errors when it
is given twice or not at all, what goes to stdout and stderr, the context left for a packed tree, and the options the
command line hands over. (tests/test_engine.py and tests/test_longctx.py run it on a real checkpoint.)"""

from types import SimpleNamespace

import pytest

from dsv4.cli import main
from dsv4.engine import generate as generate_module
from dsv4.engine.generate import generate, read_prompt
from dsv4.engine.request import Delta
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.terminal import report_speed


def test_read_prompt_takes_one_source(tmp_path):
    (tmp_path / "p.txt").write_text("from a file\n")
    assert read_prompt("given", None, None) == "given"
    assert read_prompt(None, tmp_path / "p.txt", None) == "from a file\n"
    assert read_prompt(None, None, "some/dir") == ""  # only the tree
    assert read_prompt("", None, None) == ""  # an empty prompt is still a prompt (the engine refuses it)
    with pytest.raises(ValueError, match="give a prompt or --prompt-file, not both"):
        read_prompt("given", tmp_path / "p.txt", None)
    with pytest.raises(ValueError, match="give a prompt, --prompt-file or --context-dir"):
        read_prompt(None, None, None)
    with pytest.raises(FileNotFoundError):
        read_prompt(None, tmp_path / "missing.txt", None)


def test_cli_prompt_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x")
    base = ["generate", "--ckpt", str(tmp_path)]  # never loaded: the prompt is checked first
    for argv, words in ((base + ["p", "--prompt-file", str(tmp_path / "p.txt")], "not both"),
                        (base, "give a prompt, --prompt-file or --context-dir"),
                        (base + ["--prompt-file", str(tmp_path / "missing.txt")], "missing.txt")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsv4 generate: error:") and words in err and len(err.splitlines()) == 1


class ScriptedEngine:
    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len, self.prompts = tokenizer, max_len, []
        self.stats = {"steps": 3, "prefill_tokens": 0, "decode_tokens": 2, "drafted": 2, "accepted": 1}

    def stream(self, ids, params, progress=None, max_new_tokens=0, stop=()):
        self.prompts.append(dict(ids=list(ids), params=params, max_new_tokens=max_new_tokens, stop=stop))
        self.stats["prefill_tokens"] = len(ids)
        yield Delta(0, "ab", [1])
        yield Delta(0, "c", [2], finish_reason="stop")


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


@pytest.fixture
def engines(monkeypatch):
    made = []
    model = SimpleNamespace(args=SimpleNamespace(max_seq_len=1000))

    def load_engine(model, tok, max_len=None, **kw):
        made.append(ScriptedEngine(tok, max_len))
        made[-1].load = kw
        return made[-1]
    monkeypatch.setattr(generate_module, "load_model", lambda ckpt, device, dtype, **_: (model, ByteTokenizer()))
    monkeypatch.setattr(generate_module, "load_engine", load_engine)
    return made


def test_generate_streams_the_text_and_reports_on_stderr(engines, capsys):
    assert generate("ckpt", "hello", max_new_tokens=5, stop=["\n\n"]) == "abc"
    out, err = capsys.readouterr()
    assert out == "abc\n"
    assert err.startswith("[3 tokens in ") and "prefill 5 tokens" in err and "tokens/s" in err
    assert "MTP acceptance 50%" in err and err.rstrip().endswith("; stopped: stop]")
    [engine] = engines
    # the cache holds the prompt and the completion, rounded up (one shape for compiled steps across runs)
    assert engine.max_len == generate_module.MIN_CACHE_LEN
    assert engine.prompts[0] == dict(ids=list(b"hello"), params=SamplingParams(temperature=0.0), max_new_tokens=5,
                                     stop=["\n\n"])


def test_generate_packs_a_tree_before_the_prompt(engines, tmp_path, capsys):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("A\n")
    generate("ckpt", "Q", context_dir=str(root), max_new_tokens=4, max_len=100)
    [engine] = engines
    packed = list(b"===== a.txt =====\nA\n")
    assert engine.prompts[0]["ids"] == packed + list(b"Q") and engine.max_len == 100
    assert "[context: 1 files" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="the prompt is empty"):  # no prompt, and the tree packed nothing
        generate("ckpt", context_dir=str(empty))
    with pytest.raises(ValueError, match="no room left"):  # the prompt and the completion fill the context
        generate("ckpt", "Q" * 95, context_dir=str(root), max_new_tokens=4, max_len=100)


def test_report_speed_without_tokens_or_speculation():
    stats = {"steps": 1, "prefill_tokens": 7, "decode_tokens": 0, "drafted": 0, "accepted": 0}
    line = report_speed(stats, t0=0.0, first=None, finish_reason=None)
    assert line.startswith("[0 tokens in ") and "prefill 7 tokens 0.00 s" in line and line.endswith("]")
    assert "MTP" not in line and "stopped" not in line


def test_cli_generate_hands_its_options_over(monkeypatch, tmp_path):
    seen = {}

    def fake_generate(ckpt, prompt, **kw):
        seen.update(kw, ckpt=ckpt, prompt=prompt)
        return ""
    monkeypatch.setattr(generate_module, "generate", fake_generate)
    argv = ["generate", "--ckpt", str(tmp_path), "a prompt", "--temperature", "0.5", "--seed", "3", "--min-p", "0.1",
            "--repetition-penalty", "1.2", "--stop", "x", "--stop", "y", "--compile", "--device", "cpu"]
    assert main(argv) == 0
    assert seen["prompt"] == "a prompt" and seen["prompt_file"] is None and seen["context_dir"] is None
    assert seen["params"] == SamplingParams(temperature=0.5, seed=3, min_p=0.1, repetition_penalty=1.2)
    assert seen["stop"] == ["x", "y"] and seen["max_new_tokens"] == 256
    assert seen["compile"] is True and seen["speculative"] is None and seen["device"] == "cpu"
    assert seen["max_len"] is None and seen["dtype"] == "auto" and seen["prefix_cache_gb"] == 1.0
    assert main(argv[:-3] + ["--no-compile"]) == 0 and seen["compile"] is False
    assert main(argv[:-3]) == 0 and seen["compile"] == "auto"  # the default: compiled where a backend exists
