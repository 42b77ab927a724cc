"""Evaluation: the sandbox contains bad candidates, the HumanEval harness scores canonical solutions 164/164 and broken
ones 0/164, pass@k matches hand-computed values, bits-per-byte matches closed forms and the bigram baseline."""

import math
import os
import sys
import time

import pytest
import torch

from dsv4.eval import bpb as B
from dsv4.eval import humaneval as H
from dsv4.eval.sandbox import Limits, can_run_as_nobody, network_namespace_prefix, run_program

FAST = Limits(timeout=3.0, cpu_seconds=5)


# ---------------------------------------------------------------- sandbox

def test_sandbox_pass_fail_and_stdlib():
    assert run_program("import math, re, collections, hashlib, itertools\nassert math.gcd(12, 18) == 6").passed
    r = run_program("assert 1 == 2, 'wrong'")
    assert (r.status, r.reason) == ("failed", "AssertionError: wrong")
    assert run_program("def f(:\n").status == "failed"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def test_sandbox_wall_clock_timeout_kills_process_group(tmp_path):
    os.chmod(tmp_path, 0o777)  # the candidate may run as `nobody`
    pidfile = tmp_path / "helper.pid"
    code = (f"import os, time\nif os.fork() == 0:\n    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            "    time.sleep(60)\ntime.sleep(60)")
    t0 = time.perf_counter()
    r = run_program(code, Limits(timeout=1.0))
    assert r.status == "timeout" and time.perf_counter() - t0 < 5
    time.sleep(0.2)
    assert not _alive(int(pidfile.read_text()))  # the forked helper died with the candidate


def test_sandbox_finished_candidate_does_not_wait_for_its_children():
    t0 = time.perf_counter()
    r = run_program("import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)", FAST)
    assert r.passed and time.perf_counter() - t0 < 2


def test_sandbox_infinite_loop_hits_cpu_limit():
    r = run_program("while True:\n    pass", Limits(timeout=20.0, cpu_seconds=1))
    assert (r.status, r.reason) == ("timeout", "CPU time limit")


def test_sandbox_memory_bomb_is_stopped():
    r = run_program("x = bytearray(8 << 30)", Limits(memory_bytes=512 << 20))
    assert r.status == "failed" and "MemoryError" in r.reason
    r = run_program("xs = []\nwhile True:\n    xs.append(' ' * (64 << 20))", Limits(memory_bytes=512 << 20))
    assert not r.passed and "MemoryError" in r.reason


def test_sandbox_has_no_network():
    for code in ["import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
                 "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)"]:
        for netns in (True, False):  # with and without a network namespace: the socket patch alone suffices
            r = run_program(code, Limits(timeout=3.0, network_namespace=netns))
            assert r.status == "failed" and "network access is disabled" in r.reason, (code, r)


@pytest.mark.skipif(not network_namespace_prefix(), reason="`unshare` cannot make a network namespace here")
def test_sandbox_network_namespace_has_only_loopback():
    code = ("ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
            "assert ifaces == ['lo'], ifaces")
    assert run_program(code, FAST).passed


def test_sandbox_files_stay_in_its_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = f"import os\nopen('pwned.txt', 'w').write('x')\nassert os.getcwd() != {str(tmp_path)!r}"
    assert run_program(code, FAST).passed
    assert os.listdir(tmp_path) == []
    r = run_program("open('big.bin', 'wb').write(b'x' * (64 << 20))", Limits(file_bytes=1 << 20))
    assert not r.passed


def test_sandbox_output_spam_does_not_hang():
    t0 = time.perf_counter()
    assert run_program("import sys\nfor _ in range(20000):\n    print('x' * 1000)\n    sys.stderr.write('y' * 1000)",
                       FAST).passed
    r = run_program("while True:\n    print('spam' * 1000)", Limits(timeout=1.0))
    assert r.status == "timeout" and time.perf_counter() - t0 < 8


def test_sandbox_exit_without_running_the_test_is_not_a_pass():
    assert run_program("import os\nos._exit(0)\nassert False", FAST).status == "error"
    assert run_program("import sys\nsys.exit(0)\nassert False", FAST).status == "failed"


def _world_readable_python() -> str | None:
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python) and can_run_as_nobody(python):
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0 or _world_readable_python() is None,
                    reason="needs root and a Python that `nobody` can run")
def test_sandbox_as_root_runs_candidate_as_nobody_with_a_process_limit(tmp_path):
    limits = Limits(python=_world_readable_python(), max_processes=5)
    assert run_program("import os\nassert os.getuid() == 65534\nopen('ok.txt', 'w').write('x')", limits).passed
    os.chmod(tmp_path, 0o755)  # root's directory: readable, not writable, by others
    r = run_program(f"open({str(tmp_path / 'pwned.txt')!r}, 'w')", limits)
    assert r.status == "failed" and "PermissionError" in r.reason and os.listdir(tmp_path) == []
    fork_bomb = ("import os, time\nfor _ in range(40):\n"
                 "    if os.fork() == 0:\n        time.sleep(5)\n        os._exit(0)")
    r = run_program(fork_bomb, limits)
    assert r.status == "failed" and "BlockingIOError" in r.reason


# ---------------------------------------------------------------- HumanEval

def test_truncate_at_stop_sequences():
    body = "    return a + b\n"
    assert H.truncate(body + "\ndef other():\n    pass") == body
    assert H.truncate(body + "\n# test\nprint(1)") == body
    assert H.truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert H.truncate(body + "    # an indented comment stays\n") == body + "    # an indented comment stays\n"
    assert H.truncate(body) == body


def test_pass_at_k_hand_computed():
    assert H.pass_at_k(10, 0, 1) == 0.0
    assert H.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert H.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert H.pass_at_k(10, 1, 10) == 1.0                                # n - c < k
    assert H.pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))


def test_evaluate_pass_at_k_on_toy_problems():
    problems = {f"t/{i}": {"prompt": "def f(x):\n", "entry_point": "f",
                           "test": f"def check(g):\n    assert g({i}) == {i}\n"} for i in range(2)}
    samples = {"t/0": ["    return x\n", "    return 0\n", "    return None\n"],     # 2 of 3 pass
               "t/1": ["    return x\n", "    return 0\n", "    return None\n"]}     # 1 of 3 passes
    report = H.evaluate(samples, k=(1, 2, 5), problems=problems, limits=FAST)
    assert report.num_passed == 3 and report.num_samples == 6
    assert report.pass_at[1] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert report.pass_at[2] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)   # t/1: 1 - C(2,2)/C(3,2)
    assert 5 not in report.pass_at                                        # fewer than 5 samples per task
    assert [r.passed for r in report.results["t/0"]] == [True, True, False]


def test_generate_samples_truncates_with_the_hook():
    problems = H.load_problems()
    assert len(problems) == 164
    few = dict(list(problems.items())[:3])
    samples = H.generate_samples(lambda prompt: "    return 1\n\ndef junk():\n    pass", few, num_samples=2)
    assert samples == {tid: ["    return 1\n"] * 2 for tid in few}


@pytest.mark.slow
def test_harness_scores_canonical_solutions_164_of_164():
    problems = H.load_problems()
    report = H.evaluate({tid: [p["canonical_solution"]] for tid, p in problems.items()}, k=(1,))
    failed = {tid: rs[0] for tid, rs in report.results.items() if not rs[0].passed}
    assert failed == {} and report.num_passed == 164 and report.pass_at == {1: 1.0}


@pytest.mark.slow
def test_harness_scores_broken_solutions_0_of_164():
    problems = H.load_problems()
    broken = ["    return None\n", "    raise NotImplementedError\n", "    pass\n", "    import os\n    os._exit(0)\n",
              "    return 0\n", "    return\n"]
    samples = {tid: [broken[i % len(broken)]] for i, tid in enumerate(problems)}
    for tid in list(problems)[::41]:                                     # a few that never return (1 s each)
        samples[tid] = ["    while True:\n        pass\n"]
    report = H.evaluate(samples, k=(1,), limits=Limits(timeout=2.0, cpu_seconds=1))
    assert report.num_passed == 0 and report.pass_at == {1: 0.0}


# ---------------------------------------------------------------- bits per byte

def test_bpb_of_uniform_model_is_log2_vocab():
    V, seq_len = 37, 16
    tokens = torch.randint(0, V, (1000,), generator=torch.Generator().manual_seed(0))
    r = B.bits_per_byte(lambda ids: torch.zeros(*ids.shape, V), tokens, torch.ones(V), seq_len, batch_size=4)
    assert r.tokens == 999 and r.bytes == 999                          # every token after the first, once
    assert r.bpb == pytest.approx(math.log2(V))


def test_bpb_divides_by_bytes_and_skips_special_tokens():
    V = 8
    lengths = torch.tensor([0, 1, 2, 3, 4, 1, 2, 3])                     # token 0 is special: no bytes
    tokens = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 7, 0, 1])
    r = B.bits_per_byte(lambda ids: torch.zeros(*ids.shape, V), tokens, lengths, seq_len=3)
    targets = tokens[1:]
    counted = targets[targets != 0]
    assert r.tokens == len(counted) and r.bytes == int(lengths[counted].sum())
    assert r.bpb == pytest.approx(len(counted) * math.log(V) / (math.log(2) * r.bytes))


@pytest.mark.parametrize("n", [1, 2, 17, 64, 65, 100, 203])
@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (16, 5), (16, 1), (7, 3)])
def test_windows_score_every_target_once_with_enough_context(n, seq_len, stride):
    tokens = torch.arange(n)
    scored = []
    for w, skip in B.windows(tokens, seq_len, stride):
        assert len(w) <= seq_len + 1 and skip < len(w) - 1
        new = w[1 + skip:].tolist()
        if scored:  # after the first window, each target sees at least seq_len - stride tokens before it
            assert all(t - int(w[0]) >= seq_len - stride for t in new)
        scored += new
    assert scored == list(range(1, n))


def test_windows_reject_a_stride_outside_the_window():
    for stride in (0, 17):
        with pytest.raises(ValueError, match="stride must be in 1..seq_len"):
            B.windows(torch.arange(50), 16, stride)


def test_sliding_bpb_equals_the_sum_of_per_position_losses():
    """A model whose logits depend on the position in its window: the strided bpb must add up the losses of exactly
    the positions `windows` says are new, each target once."""
    V, seq_len, stride = 11, 12, 5
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (140,), generator=g)
    lengths = torch.randint(0, 4, (V,), generator=g)
    table = torch.randn(seq_len, V, generator=g)

    def logits_fn(ids):  # [B, S] -> [B, S, V]: row s of the table for position s, whatever the ids
        return table[: ids.shape[1]].expand(ids.shape[0], -1, -1)

    nats = nbytes = 0.0
    for w, skip in B.windows(tokens, seq_len, stride):
        for s in range(skip, len(w) - 1):
            t = int(w[s + 1])
            if lengths[t] > 0:
                nats -= torch.log_softmax(table[s], -1)[t].item()
                nbytes += int(lengths[t])
    r = B.bits_per_byte(logits_fn, tokens, lengths, seq_len, batch_size=3, stride=stride)
    assert r.bytes == nbytes == int(lengths[tokens[1:]].sum())
    assert r.bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    disjoint = B.bits_per_byte(logits_fn, tokens, lengths, seq_len, batch_size=3)
    assert disjoint.bytes == r.bytes and disjoint.bpb != pytest.approx(r.bpb, rel=1e-3)


def test_bigram_model_as_logits_fn_equals_bigram_bpb():
    V = 20
    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, V, (3000,), generator=g) % 7, torch.randint(0, V, (500,), generator=g)
    lengths = torch.randint(1, 4, (V,), generator=g)
    for method in ("add_one", "kneser_ney"):
        vv, ww = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
        table = B.bigram_prob(train, V, vv, ww, method).view(V, V)
        assert torch.allclose(table.sum(-1), torch.ones(V, dtype=torch.double))   # each P(. | v) is normalized
        via_model = B.bits_per_byte(lambda ids, table=table: table.log()[ids], val, lengths, seq_len=33)
        direct = B.bigram_bpb(train, val, lengths, V, method)
        assert via_model.bpb == pytest.approx(direct.bpb, rel=1e-6) and via_model.bytes == direct.bytes


def test_bigram_baseline_beats_uniform_on_repetitive_stream():
    V = 64
    stream = torch.arange(10).repeat(300)
    train, val = stream[:2000], stream[2000:]
    ones = torch.ones(V)
    uniform = B.bits_per_byte(lambda ids: torch.zeros(*ids.shape, V), val, ones, seq_len=64)
    for method in ("add_one", "kneser_ney"):
        bigram = B.bigram_bpb(train, val, ones, V, method)
        assert bigram.bpb < 0.2 * uniform.bpb, (method, bigram.bpb, uniform.bpb)
    assert B.bigram_bpb(train, val, ones, V).bpb < B.bigram_bpb(train, val, ones, V, "add_one").bpb


@pytest.mark.parametrize("seed", range(4))
def test_kneser_ney_bigram_is_the_textbook_formula(seed):
    """ngram_prob at order 2 (the bigram baseline) against the interpolated Kneser-Ney formula counted by hand."""
    g = torch.Generator().manual_seed(seed)
    V, d = 9, 0.75
    train = torch.randint(0, V, (400,), generator=g) % (5 + seed)  # some tokens never occur, some contexts unseen
    pairs = list(zip(train[:-1].tolist(), train[1:].tolist()))
    c = {}
    for a, b in pairs:
        c[a, b] = c.get((a, b), 0) + 1
    types = set(c)
    p_cont = {w: (len({a for a, b in types if b == w}) + 1) / (len(types) + V) for w in range(V)}
    expected = torch.zeros(V, V, dtype=torch.double)
    for v in range(V):
        c_v = sum(n for (a, _), n in c.items() if a == v)
        followers = len({b for a, b in types if a == v})
        for w in range(V):
            expected[v, w] = (p_cont[w] if c_v == 0 else
                              max(c.get((v, w), 0) - d, 0) / c_v + d * followers / c_v * p_cont[w])
    vv, ww = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    torch.testing.assert_close(B.ngram_prob(train, V, vv[:, None], ww, order=2, discount=d).view(V, V), expected)
    val, lengths = torch.randint(0, V, (300,), generator=g), torch.randint(0, 4, (V,), generator=g)
    assert B.ngram_bpb(train, val, lengths, V, order=2).bpb == pytest.approx(B.bigram_bpb(train, val, lengths, V).bpb)


@pytest.mark.parametrize("order", [3, 4])
def test_kneser_ney_ngram_distributions_are_normalised(order):
    """P(. | h) sums to 1 for contexts seen in training, unseen ones and ones cut by the stream's start (-1)."""
    g = torch.Generator().manual_seed(order)
    V = 12
    train = torch.randint(0, V, (3000,), generator=g) % 5  # tokens 5..11 never occur
    seen = train[:order - 1 + 40].unfold(0, order - 1, 1)[:40]
    unseen = torch.randint(0, V, (20, order - 1), generator=g)
    cut = torch.randint(0, V, (10, order - 1), generator=g)
    cut[:, : order - 2] = -1
    contexts = torch.cat([seen, unseen, cut])
    p = B.ngram_prob(train, V, contexts.repeat_interleave(V, 0), torch.arange(V).repeat(len(contexts)), order)
    assert (p > 0).all()
    torch.testing.assert_close(p.view(-1, V).sum(-1), torch.ones(len(contexts), dtype=torch.double))


def test_higher_order_ngram_counts_phrases_the_bigram_cannot():
    """A stream whose next token is fixed by the two before it (and not by one): the trigram nearly knows it, the
    bigram does not; the 4-gram does no worse than the trigram."""
    g = torch.Generator().manual_seed(0)
    V = 16
    stream = [int(t) for t in torch.randint(0, V, (2,), generator=g)]
    for noise in torch.randint(0, V, (6000,), generator=g).tolist():
        stream.append((stream[-1] * 3 + stream[-2] * 5) % V if len(stream) % 3 else noise)
    stream = torch.tensor(stream)
    train, val, ones = stream[:5000], stream[5000:], torch.ones(V)
    bi, tri, four = (B.ngram_bpb(train, val, ones, V, order=n).bpb for n in (2, 3, 4))
    assert tri < 0.6 * bi and four < 1.05 * tri, (bi, tri, four)


def test_ngram_order_must_fit_the_integer_keys():
    with pytest.raises(ValueError, match="order must be >= 2"):
        B.ngram_prob(torch.arange(10), 70000, torch.zeros(1, 3), torch.zeros(1), order=4)


def test_token_byte_lengths_of_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def foo(x):\n    return x + 1  # héllo wörld 日本語 ✓"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    lengths = B.token_byte_lengths(tok)
    assert lengths[tok.token_to_id("<bos>")] == 0
    text = "def bar(y): 日本 ✓ é\n\t"
    ids = tok.encode(text).ids
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
