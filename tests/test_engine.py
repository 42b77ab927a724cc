"""The inference engine: batched, continuous, speculative generation equals plain generation; per-request sampling,
stops, logprobs, streaming and cancellation behave."""

import pytest
import torch

from dsv4 import save_pretrained
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams, speculative_verify
from dsv4.tokenizers.text import Tokenizer
from tests.helpers import FEW_SINKHORN, random_model
from tests.test_data import FEW

PROMPTS = ["def foo(x):\n    return", "import os\n", "class A:\n    def __init__(self):\n        self.x = 1\n" * 3,
           "x", "for i in range(10):\n    print(i)\n" * 4]
GREEDY = SamplingParams(temperature=0)


def shown(text: str) -> str:
    """Tokenizer.decode's text as a client sees it: bytes that never form a character become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def alone(model, tok):
    """Greedy 24-token continuations, each prompt on its own (batch 1, odd prefill chunks)."""
    return [Engine(model, tok, max_batch=1, prefill_chunk=7).generate([p], GREEDY, max_new_tokens=24,
                                                                       ignore_eos=True)[0] for p in PROMPTS]


@torch.no_grad()
def test_greedy_equals_full_forward(model, tok, alone):
    for p, out in zip(PROMPTS[:2], alone[:2]):
        ids = torch.tensor([tok.encode(p)])
        for _ in range(24):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.token_ids == ids[0, -24:].tolist()
        assert out.text == shown(tok.decode(out.token_ids)) and out.finish_reason == "length"


@pytest.mark.parametrize("speculative", [False, True])
def test_batched_greedy_equals_alone(model, tok, alone, speculative):
    """5 requests through 3 slots: requests join as others leave; MTP speculation changes nothing either."""
    engine = Engine(model, tok, max_batch=3, prefill_chunk=16, speculative=speculative)
    budgets = [24, 5, 24, 11, 24]  # early finishers free their slots for the waiting ones
    reqs = [engine.submit(p, GREEDY, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, budgets)]
    seen_running = 0
    while engine.has_work():
        engine.step()
        seen_running = max(seen_running, len(engine.running))
        assert len(engine.running) + len(engine.free) == 3
    assert seen_running == 3
    for r, a, n in zip(reqs, alone, budgets):
        assert r.output == a.token_ids[:n]
    if speculative:  # drafts were both rejected (a random MTP module) and run again correctly
        assert engine.stats["drafted"] > engine.stats["accepted"]


@pytest.mark.slow
def test_compiled_engine_equals_eager(tok):
    """compile=True runs different products (one-row loops, fused contractions, experts read in place: see
    dsv4.kernels.fused): plain decoding (width 1) and speculation (width-2 verify steps, MTP drafts) give the eager
    engine's tokens and log-probabilities. (Batch 1 only: each batch size is another compile, ~30 s cold.)"""
    model = random_model(0, **FEW_SINKHORN)

    def run(compile, speculative, prompts):
        engine = Engine(model, tok, max_batch=1, prefill_chunk=16, speculative=speculative, compile=compile)
        return engine.generate(prompts, GREEDY, max_new_tokens=10, logprobs=0, ignore_eos=True)

    for speculative, prompts in ((False, PROMPTS[:1]), (True, PROMPTS[1:2])):
        for fast, ref in zip(run(True, speculative, prompts), run(False, speculative, prompts)):
            assert fast.token_ids == ref.token_ids
            for a, b in zip(fast.logprobs, ref.logprobs):
                assert abs(a["logprob"] - b["logprob"]) < 1e-4


@torch.no_grad()
def test_warm_up_steps_commit_nothing(model, tok):
    """warm_up's dummy steps (every batch size, two entry-length buckets, drafts) write only to the spare slot: a
    running request's cache is untouched and its output unchanged."""
    engine = Engine(model, tok, max_batch=6, max_len=300, speculative=True)
    req = engine.submit(PROMPTS[2], GREEDY, max_new_tokens=6, ignore_eos=True)
    engine.step()  # prefilled: its slot holds state now
    before = [t[:6].clone() for layer in engine.cache.layers for t in layer.tensors()]
    engine._dummy_steps()
    after = [t[:6] for layer in engine.cache.layers for t in layer.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    while engine.has_work():
        engine.step()
    alone = Engine(model, tok, max_batch=1, speculative=True).generate([PROMPTS[2]], GREEDY, max_new_tokens=6,
                                                                        ignore_eos=True)[0]
    assert req.output == alone.token_ids


def test_speculative_rule_keeps_the_distribution():
    """Whatever q the draft came from, accept-or-replace yields tokens distributed as p."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 30000
    p = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=g)
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    accepted, tokens = speculative_verify(p.expand(N, V), q.expand(N, V), drafts, gens)
    freq = torch.bincount(tokens, minlength=V).float() / N
    assert (freq - p).abs().max() < 0.012
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.012  # acceptance rate = sum min(p, q)
    # the plain rule's failure (always keep the draft) would be distributed as q instead
    assert (p - q).abs().max() > 0.05


def test_sampled_speculation_runs_the_acceptance_rule(model, tok, alone):
    """Sampling with top-k 1 is greedy in distribution: the draft path with its q and p must then reproduce plain
    greedy output exactly (a one-hot p accepts a draft iff it is the argmax, and its residual is the argmax)."""
    engine = Engine(model, tok, max_batch=3, speculative=True)
    params = [SamplingParams(temperature=0.8, top_k=1, seed=i) for i in range(3)]
    out = engine.generate(PROMPTS[:3], params, max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in out] == [a.token_ids for a in alone[:3]]
    assert engine.stats["drafted"] > engine.stats["accepted"]  # replacements drawn from the residual
    runs = []
    for _ in range(2):  # at temperature 1 the random model's p and q overlap: drafts get accepted too
        spec = Engine(model, tok, max_batch=3, speculative=True)
        runs.append(spec.generate(PROMPTS[:3], [SamplingParams(temperature=1.0, seed=i) for i in range(3)],
                                  max_new_tokens=16, ignore_eos=True))
        assert spec.stats["accepted"] > 0
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]  # seeded speculation is reproducible


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tok):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, presence_penalty=0.5)
    one = Engine(model, tok, max_batch=1).generate([PROMPTS[0]], params, max_new_tokens=20, ignore_eos=True)[0]
    others = [SamplingParams(temperature=1.0, seed=i) for i in range(3)]
    many = Engine(model, tok, max_batch=4).generate(PROMPTS[1:3] + [PROMPTS[0]] + PROMPTS[3:4],
                                                    others[:2] + [params] + others[2:], max_new_tokens=20,
                                                    ignore_eos=True)
    assert many[2].token_ids == one.token_ids
    different = Engine(model, tok, max_batch=1).generate([PROMPTS[0]], SamplingParams(temperature=0.9, seed=8),
                                                         max_new_tokens=20, ignore_eos=True)[0]
    assert different.token_ids != one.token_ids


@torch.no_grad()
def test_logprobs_are_the_models(model, tok):
    out = Engine(model, tok).generate([PROMPTS[1]], GREEDY, max_new_tokens=6, logprobs=3, ignore_eos=True)[0]
    ids = torch.tensor([tok.encode(PROMPTS[1]) + out.token_ids])
    ref = torch.log_softmax(model(ids)[0, -7:-1].float(), -1)
    for row, lp, t in zip(ref, out.logprobs, out.token_ids):
        assert lp["token"] == t and abs(lp["logprob"] - row[t].item()) < 1e-4
        assert [i for i, _ in lp["top"]] == row.topk(3).indices.tolist()
        assert lp["top"][0][0] == t  # greedy: the chosen token is the most likely


def test_stop_strings_tokens_and_limits(model, tok, alone):
    full = alone[0]
    text = full.text
    stop = text[5:8]
    first = text.find(stop)
    out = Engine(model, tok).generate([PROMPTS[0]], GREEDY, max_new_tokens=24, stop=[stop], ignore_eos=True)[0]
    assert out.text == text[:first] and out.finish_reason == "stop"
    stop_tok = full.token_ids[4]
    out = Engine(model, tok).generate([PROMPTS[0]], GREEDY, max_new_tokens=24, stop_token_ids=[stop_tok],
                                      ignore_eos=True)[0]
    k = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[:k] and out.finish_reason == "stop"
    n = len(tok.encode(PROMPTS[0]))
    out = Engine(model, tok, max_len=n + 3).generate([PROMPTS[0]], GREEDY, max_new_tokens=24, ignore_eos=True)[0]
    assert out.token_ids == full.token_ids[:3] and out.finish_reason == "length"  # the context is full


def test_stream_deltas_are_utf8_and_add_up(model, tok):
    engine = Engine(model, tok, max_batch=2)
    params = SamplingParams(temperature=1.0, seed=3)
    deltas = list(engine.stream(PROMPTS[3], params, max_new_tokens=40, ignore_eos=True))
    for d in deltas:
        d.text.encode("utf-8")  # raises on a lone surrogate (a split multi-byte character)
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    ref = Engine(model, tok).generate([PROMPTS[3]], params, max_new_tokens=40, ignore_eos=True)[0]
    assert "".join(d.text for d in deltas) == ref.text == shown(tok.decode(ref.token_ids))
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids


def test_cancel_frees_the_slot(model, tok):
    engine = Engine(model, tok, max_batch=2)
    got = []
    a = engine.submit(PROMPTS[0], GREEDY, max_new_tokens=50, ignore_eos=True, callback=got.append)
    b = engine.submit(PROMPTS[1], GREEDY, max_new_tokens=50, ignore_eos=True)
    c = engine.submit(PROMPTS[2], GREEDY, max_new_tokens=3, ignore_eos=True)
    engine.step()
    engine.step()
    assert c in engine.waiting and not engine.free
    engine.cancel(a.id)
    deltas = engine.step()
    assert a.finish_reason == "cancelled" and got[-1].finish_reason == "cancelled"
    assert any(d.request_id == a.id and d.finish_reason == "cancelled" for d in deltas)
    assert c in engine.running  # took a's slot in the same step
    stream = engine.stream(PROMPTS[3], GREEDY, max_new_tokens=50, ignore_eos=True)
    next(stream)
    stream.close()  # a client that goes away
    while engine.has_work():
        engine.step()
    assert sorted(engine.free) == [0, 1] and b.finish_reason == "length" and c.finish_reason == "length"


def test_bad_requests_say_why(model, tok):
    engine = Engine(model, tok, max_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit("")
    with pytest.raises(ValueError, match="the context holds 64 .* at most 63 prompt tokens"):
        engine.submit([1] * 64)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.submit("x", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        engine.submit([5, 512])
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        Engine(random_model(0, n_mtp_layers=0, compress_ratios=[0, 4, 16, 4]), tok, speculative=True)
    with pytest.raises(ValueError, match="compile must be False, True or 'max', got 'on'"):
        Engine(model, tok, compile="on")


# --- the CLI on a saved checkpoint ---
@pytest.fixture(scope="module")
def ckpt(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, path)
    tok.save(path / "tokenizer.json")
    return path


def test_cli_generate_streams_the_engines_greedy_text(ckpt, alone, capsys, tmp_path):
    from dsv4.cli import main

    argv = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "24", "--dtype", "fp32", "--stop", "\x00never",
            "--no-compile"]
    assert main(argv + [PROMPTS[0]]) == 0
    out = capsys.readouterr()
    # greedy, MTP speculation on by default: the text equals the plain engine's (eos may end it earlier)
    assert out.out[:-1] == alone[0].text[: len(out.out) - 1] and out.out.endswith("\n")
    assert "tokens/s" in out.err and "MTP acceptance" in out.err
    (tmp_path / "p.txt").write_text(PROMPTS[0])
    assert main(argv + ["--prompt-file", str(tmp_path / "p.txt"), "--no-speculative"]) == 0
    again = capsys.readouterr()
    assert again.out == out.out and "MTP" not in again.err
    assert main(argv) == 2 and "give a prompt, --prompt-file or --context-dir" in capsys.readouterr().err
    assert main(argv + ["x" * 5000, "--max-len", "100"]) == 2
    assert "the context holds 100" in capsys.readouterr().err


def test_cli_chat_keeps_history_and_resets(ckpt, tok, model, capsys, monkeypatch):
    from dsv4 import cli

    lines = iter(["hello", "and more", "/reset", "again", None])
    prompts = []
    real_stream = Engine.stream

    def spy(self, prompt, *a, **k):
        prompts.append(list(prompt))
        return real_stream(self, prompt, *a, **k)

    def read(_):
        line = next(lines)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr(Engine, "stream", spy)
    opts = cli.parser().parse_args(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "8", "--temperature", "0",
                                    "--speculative", "--dtype", "fp32", "--no-compile"])
    assert cli.run_chat(opts, read=read) == 0
    out = capsys.readouterr().out
    assert out.count("dsv4> ") == 3
    first, second, third = prompts
    assert first == tok.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    assert second[: len(first)] == first and len(second) > len(first) + 3  # the history came along
    assert third == tok.encode_chat([{"role": "user", "content": "again"}], add_generation_prompt=True)[0]


def test_cli_chat_ctrl_c_stops_the_answer_not_the_chat(ckpt, capsys, monkeypatch):
    from dsv4 import cli

    lines = iter(["hello", "second", "/exit"])
    engines, real_stream = [], Engine.stream

    def interrupted(self, prompt, *a, **k):
        engines.append(self)
        inner = real_stream(self, prompt, *a, **k)

        class Stream:  # the user presses Ctrl-C after the first delta of the first answer
            def __iter__(self):
                yield next(inner)
                if len(engines) == 1:
                    raise KeyboardInterrupt
                yield from inner

            def close(self):
                inner.close()
        return Stream()

    monkeypatch.setattr(Engine, "stream", interrupted)
    opts = cli.parser().parse_args(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "8", "--temperature", "0",
                                    "--no-speculative", "--dtype", "fp32", "--no-compile"])
    assert cli.run_chat(opts, read=lambda _: next(lines)) == 0
    out = capsys.readouterr().out
    assert "[stopped]" in out and out.count("dsv4> ") == 2  # the chat went on to the second question
    engine = engines[0]
    assert not engine.has_work() and len(engine.free) == engine.max_batch


def test_constrained_requests_write_exact_spans_beside_free_ones(model, tok, alone):
    """A visual span's grammar as a request's processor: greedy, it picks the argmax of the masked full-forward
    logits; sampled, every span parses to its exact shape; a free request in the same batch is untouched; an engine
    with speculation refuses a processor."""
    from dsv4.tokenizers.multimodal import SpanConstraint, VisualVocab
    from dsv4.tokenizers.text import BOI, BOV, EOI, EOV

    v = VisualVocab(300, 100, 4, *(tok.token_id(t) for t in (BOI, EOI, BOV, EOV)))  # ids < the model's 512
    image = tok.encode("a red circle") + [v.boi]
    engine = Engine(model, tok, max_batch=3, prefill_chunk=16)
    greedy = engine.submit(image, GREEDY, max_new_tokens=5, ignore_eos=True, processor=SpanConstraint(v))
    clip = engine.submit(tok.encode("x") + [v.bov], SamplingParams(temperature=1.5, seed=3), max_new_tokens=11,
                         ignore_eos=True, processor=SpanConstraint(v, steps=2, video=True))
    free = engine.submit(PROMPTS[0], GREEDY, max_new_tokens=24, ignore_eos=True)
    while engine.has_work():
        engine.step()
    assert free.output == alone[0].token_ids
    ids, c = torch.tensor([image]), SpanConstraint(v)
    for _ in range(5):
        t = int(c.mask(model(ids)[0, -1].float()).argmax())
        c.advance(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    assert greedy.output == ids[0, len(image):].tolist() and greedy.output[-1] == v.eoi
    ((kind, codes),) = v.parse([v.bov] + clip.output)
    assert kind == "video" and codes.shape == (2, 4)
    spec = Engine(model, tok, speculative=True)  # a constrained row drafts nothing: the same tokens
    again = spec.submit(image, GREEDY, max_new_tokens=5, ignore_eos=True, processor=SpanConstraint(v))
    while spec.has_work():
        spec.step()
    assert again.output == greedy.output


def test_guided_requests_sample_from_the_guided_logits(model, tok, alone):
    """Classifier-free guidance: scale 1 is the plain conditional run, scale 0 the unconditional prompt's own run,
    and scale 3 the argmax of u + 3 (c - u) from two full forwards, also when the conditional prompt needs more
    prefill steps than the unconditional one; beside a free request, with a span grammar, and refused where it
    cannot run."""
    from dsv4.tokenizers.multimodal import SpanConstraint, VisualVocab
    from dsv4.tokenizers.text import BOI, BOV, EOI, EOV

    cond, uncond = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])
    engine = Engine(model, tok, max_batch=5, prefill_chunk=4)  # the conditional prompt takes more steps to prefill
    one = engine.submit(cond, GREEDY, max_new_tokens=24, ignore_eos=True, guidance=(uncond, 1.0))
    zero = engine.submit(cond, GREEDY, max_new_tokens=24, ignore_eos=True, guidance=(uncond, 0.0))
    free = engine.submit(PROMPTS[3], GREEDY, max_new_tokens=24, ignore_eos=True)
    while engine.has_work():
        engine.step()
    assert one.output == alone[0].token_ids and zero.output == alone[1].token_ids
    assert free.output == alone[3].token_ids and not engine.running and len(engine.free) == 5
    three = Engine(model, tok, max_batch=2, prefill_chunk=4).generate([cond], GREEDY, max_new_tokens=8,
                                                                      ignore_eos=True, guidance=(uncond, 3.0))[0]
    c, u = torch.tensor([cond]), torch.tensor([uncond])
    for _ in range(8):
        lc, lu = model(c)[:, -1].float(), model(u)[:, -1].float()
        t = (lu + 3 * (lc - lu)).argmax(-1, keepdim=True)
        c, u = torch.cat([c, t], 1), torch.cat([u, t], 1)
    assert three.token_ids == c[0, len(cond):].tolist()
    v = VisualVocab(300, 100, 4, *(tok.token_id(t) for t in (BOI, EOI, BOV, EOV)))
    out = Engine(model, tok, max_batch=2).generate([cond + [v.boi]], SamplingParams(temperature=1.0, seed=1),
                                                   max_new_tokens=5, ignore_eos=True, guidance=([v.boi], 2.0),
                                                   processor=SpanConstraint(v))[0]
    assert v.parse([v.boi] + out.token_ids)[0][1].shape == (1, 4)
    with pytest.raises(ValueError, match="max_batch >= 2"):
        Engine(model, tok, max_batch=1).submit(cond, guidance=(uncond, 2.0))
