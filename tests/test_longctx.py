"""Long contexts: the lightning indexer's blocked scan selects what the one-shot top-k selects, prefill through the
long-context paths gives the same tokens, the temporaries of a prefill do not grow with the context (and stay under
`dsv4 info`'s estimate), and the cache accounting on the meta device matches real allocations."""

import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import ModelArgs
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.model.attention import Attention
from dsv4.model.cache import KVCache
from dsv4.model.indexer import Indexer, scan_block
from dsv4.tokenizers.text import Tokenizer
from dsv4.weights.info import engine_cache_bytes, prefill_memory, prefill_working_set
from tests.helpers import tiny_args
from tests.test_engine import model, tok  # noqa: F401  (fixtures)

GREEDY = SamplingParams(temperature=0)


def small_blocks(monkeypatch, scan_above: int = 0, budget: int = 1 << 12):
    """Make every prefill take the long-context paths: scan always, tiny scan and attention blocks."""
    monkeypatch.setattr(Indexer, "SCAN_ABOVE", scan_above)
    monkeypatch.setattr(Indexer, "SCAN_BLOCK", 32)
    monkeypatch.setattr(Indexer, "SCAN_MIN_BLOCK", 8)
    monkeypatch.setattr(Indexer, "SCAN_SUB", 16)
    monkeypatch.setattr(Indexer, "SCAN_QUERIES", 16)
    monkeypatch.setattr(Attention, "ATTEND_BUDGET", budget)


def scan_cases(n: int, seed: int = 0):
    """Random scan inputs: batch rows at their own positions or shared ones, exact ties (zero keys give zero
    scores), fewer visible entries than top-k, query counts around the block sizes."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        B = 1 + i % 2
        s = int(torch.randint(1, 50, (), generator=g))
        T = int(torch.randint(1, 200, (), generator=g))
        q = torch.randn(B, s, 16, 32, generator=g)
        keys = torch.randn(B, T, 32, generator=g)
        if i % 3 == 0:
            keys[:, ::2] = 0
        w = torch.randn(B, s, 16, generator=g)
        hi = 4 * T + 8
        pos = torch.randint(0, hi, (B, s) if i % 2 else (s,), generator=g)
        yield q, keys, w, pos, T


def test_scan_selects_what_the_one_shot_top_k_selects(monkeypatch):
    small_blocks(monkeypatch)
    ix = Indexer(tiny_args())
    checked_ties = 0
    for q, keys, w, pos, T in scan_cases(60):
        ref = ix.select(ix.scores(q, keys, w, pos), pos)
        got = ix.scan(q, w, pos, lambda a, b, keys=keys: keys[:, a:b], T)
        assert got.shape == ref.shape
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
        checked_ties += int((keys == 0).any())
    assert checked_ties >= 10


def test_scan_breaks_ties_toward_recent_entries(monkeypatch):
    """All-zero scores: every block ties; the k most recent visible entries win, as in the one-shot selection."""
    small_blocks(monkeypatch)
    ix = Indexer(tiny_args())
    q, keys, w = torch.randn(1, 3, 16, 32), torch.zeros(1, 100, 32), torch.rand(1, 3, 16)
    pos = torch.tensor([399, 200, 30])
    got = ix.scan(q, w, pos, lambda a, b: keys[:, a:b], 100).sort(-1).values
    visible = [100, 50, 7]
    for row, v in zip(got[0], visible):
        expected = list(range(max(v - 8, 0), v))
        assert row.tolist() == [-1] * (8 - len(expected)) + expected


@pytest.mark.slow
def test_compiled_scan_blocks_equal_eager(monkeypatch):
    """The compiled block (what the engine runs where a compiler exists) returns the eager block's selection."""
    small_blocks(monkeypatch)
    ix = Indexer(tiny_args())
    compiled = torch.compile(scan_block, dynamic=False)
    monkeypatch.setattr(ix, "scan_block", compiled)
    for q, keys, w, pos, T in scan_cases(12, seed=1):
        ref = ix.select(ix.scores(q, keys, w, pos), pos)
        got = ix.scan(q, w, pos, lambda a, b, keys=keys: keys[:, a:b], T)
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)


def prompts(n: int, lengths=(700, 431)):
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 512, (L,), generator=g).tolist() for L in lengths]


def test_long_context_prefill_gives_the_same_tokens(model, tok, monkeypatch):
    """Two prompts prefilled together through the blocked scan and blocked attention (forced on at this length)
    continue exactly as each does alone through the one-shot paths, and as the full forward predicts."""
    ps = prompts(0)
    reference = [Engine(model, tok, max_batch=1, prefill_chunk=128, compile_scan=False)
                 .generate([p], GREEDY, max_new_tokens=8, logprobs=0, ignore_eos=True)[0] for p in ps]
    with torch.no_grad():
        logits = model(torch.tensor([ps[0]]))[0, -1]
    assert reference[0].token_ids[0] == int(logits.argmax())
    small_blocks(monkeypatch)
    engine = Engine(model, tok, max_batch=2, prefill_chunk=128, compile_scan=False)
    for got, ref in zip(engine.generate(ps, GREEDY, max_new_tokens=8, logprobs=0, ignore_eos=True), reference):
        assert got.token_ids == ref.token_ids
        for a, b in zip(got.logprobs, ref.logprobs):
            assert abs(a["logprob"] - b["logprob"]) < 1e-4
    with torch.no_grad():  # the whole-sequence forward (inference) takes the scan too
        assert torch.allclose(model(torch.tensor([ps[0]]))[0, -1], logits, atol=1e-4)


class LiveTensors(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the mode that are alive at once (by storage), and the largest."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.largest, self.storages = 0, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.storages and key not in inputs:  # not a view or an in-place result
                    n = storage.nbytes()
                    self.storages[key] = n
                    self.live += n
                    self.peak, self.largest = max(self.peak, self.live), max(self.largest, n)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.storages.pop(key, 0)


def prefill_temporaries(model, tok, length: int) -> LiveTensors:
    engine = Engine(model, tok, max_batch=1, max_len=length + 2, prefill_chunk=256, compile_scan=False)
    engine.submit(prompts(1, (length,))[0], GREEDY, max_new_tokens=1, ignore_eos=True)
    with LiveTensors() as live:  # the cache exists already: only the prefill's own tensors count
        while engine.has_work():
            engine.step()
    return live


def test_prefill_temporaries_do_not_grow_with_the_context(model, tok, monkeypatch):
    """1K and 6K tokens (scan and attention blocks scaled down with the lengths): the largest temporary and the bytes
    alive at once stay the same (the [S, S/m] indexer scores at 6K alone would be 36 MB in fp32), and under
    `dsv4 info`'s working-set estimate for these block sizes."""
    small_blocks(monkeypatch, scan_above=1 << 14, budget=1 << 14)
    monkeypatch.setattr(Indexer, "SCAN_BLOCK", 256)
    monkeypatch.setattr(Indexer, "SCAN_QUERIES", 64)
    short, long = prefill_temporaries(model, tok, 1024), prefill_temporaries(model, tok, 6144)
    assert long.largest <= short.largest * 1.1 + (1 << 14)
    assert long.peak <= short.peak * 1.1 + (1 << 16)
    assert long.largest < 2 << 20
    estimate = prefill_working_set(model.args, 6144, torch.float32, chunk=256)["total"]
    assert long.peak <= estimate


def test_info_reports_prefill_memory_for_any_context():
    args = ModelArgs.from_name("v4-flash")
    small, large = prefill_memory(args, 131072), prefill_memory(args, 1 << 20)
    assert small["weights"] == large["weights"]
    # bounded by the chunk, not the context: 8x the tokens, a few percent more (HCA's O(L/128) entries read)
    assert abs(large["working_set"] / small["working_set"] - 1) < 0.15
    assert large["total"] == large["weights"] + large["cache"] + large["working_set"]
    assert 6e9 < large["cache"] < 8e9  # V4-Flash at 1M: ~6.7 KiB per token
    assert large["working_set"] < 2 ** 31  # bounded by the chunk, not the context
    out = subprocess.run([sys.executable, "-m", "dsv4", "info", "--preset", "tiny", "--context", "2000000", "--json"],
                         capture_output=True, text=True, check=True).stdout
    mem = json.loads(out)["prefill_memory"]["2000000"]
    assert mem["cache"] == engine_cache_bytes(tiny_args(), 2000000, torch.bfloat16) > 100e6  # past max_seq_len too


@pytest.mark.parametrize("preset", ["v4-flash", "v4-pro"])
def test_meta_cache_accounting_matches_the_theory_at_1m(preset):
    """The engine's cache for one 1M-token sequence, sized on the meta device, against the closed form from the
    config (compressed entries, indexer keys, window ring, open compressor rows): within 5%."""
    from dsv4.weights.info import cache_bytes

    args = ModelArgs.from_name(preset)
    layers = range(args.n_layers + args.n_mtp_layers)
    theory = cache_bytes(args, layers, 1 << 20, torch.bfloat16)["total"]
    meta = engine_cache_bytes(args, 1 << 20, torch.bfloat16)
    assert abs(meta / theory - 1) < 0.05


ALLOCATE = """
import json, sys, torch
from dsv4 import ModelArgs
from dsv4.weights.info import engine_cache_bytes
from dsv4.model.cache import KVCache
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
args = ModelArgs.from_name(sys.argv[1], n_layers=12, n_mtp_layers=1, compress_ratios=ModelArgs.from_name(
    sys.argv[1]).compress_ratios[:12] + [0], max_seq_len=1 << 20)
before = rss()
cache = KVCache(args, slots=1, max_len=1 << 17, dtype=torch.bfloat16)
print(json.dumps({"real": rss() - before, "meta": 2 * engine_cache_bytes(args, 1 << 17, torch.bfloat16)}))
"""


@pytest.mark.parametrize("preset", ["v4-flash", "v4-pro"])
def test_meta_cache_accounting_matches_a_real_allocation(preset):
    """A scaled-down model (the preset's first 12 layers + an MTP layer, 128K tokens: ~100-150 MB) really allocates
    what the meta-device accounting says (one slot + the engine's spare), measured as resident memory: within 5%."""
    out = subprocess.run([sys.executable, "-c", ALLOCATE, preset], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["meta"] > 50e6
    assert abs(r["real"] / r["meta"] - 1) < 0.05, r


# --- repository-scale prompts: --context-dir ---
def make_tree(root):
    root.mkdir(exist_ok=True)
    (root / "pkg").mkdir()
    (root / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    (root / "pkg" / "a.py").write_text("def a():\n    return 1")  # no final newline
    (root / "README.md").write_text("# demo\n" + "words " * 400)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01")
    (root / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "z_last.py").write_text("Z = 26\n")
    (root / "link.py").symlink_to(root / "z_last.py")
    return root


def test_pack_tree_order_headers_skips_and_budget(tmp_path, tok):
    from dsv4.data.context import pack_tree

    root = make_tree(tmp_path)
    full = pack_tree(root, tok, budget=10 ** 6)
    assert full.files == ["README.md", "pkg/a.py", "pkg/b.py", "z_last.py"]  # sorted at every level
    assert dict(full.left_out) == {"image.png": "binary", "latin1.txt": "binary"}  # .git, caches, links unseen
    assert full.text.startswith("===== README.md =====\n# demo\n")
    assert "===== pkg/a.py =====\ndef a():\n    return 1\n===== pkg/b.py =====\n" in full.text
    blocks = full.text.split("===== ")[1:]
    assert full.ids == [t for b in blocks for t in tok.encode("===== " + b)]  # each file encoded on its own
    readme = len(tok.encode("===== " + blocks[0]))
    small = pack_tree(root, tok, budget=full.tokens - readme)  # the README no longer fits; the rest still does
    assert small.files == ["pkg/a.py", "pkg/b.py", "z_last.py"] and ("README.md", "did not fit") in small.left_out
    assert small.tokens <= full.tokens - readme
    assert "left out 2 binary, 1 did not fit" in small.summary()
    assert pack_tree(root, tok, budget=full.tokens).files == full.files
    with pytest.raises(ValueError, match="not a directory"):
        pack_tree(root / "README.md", tok, 100)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.serve_util import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_cli_generate_packs_a_source_tree(ckpt, tmp_path, capsys, monkeypatch):
    """--context-dir puts the packed tree before the prompt, within --max-len, and says what did not fit."""
    from dsv4.cli import main
    from dsv4.data.context import pack_tree

    root = make_tree(tmp_path / "tree")
    prompts, real_stream = [], Engine.stream

    def spy(self, prompt, *a, **k):
        prompts.append(list(prompt))
        return real_stream(self, prompt, *a, **k)

    monkeypatch.setattr(Engine, "stream", spy)
    argv = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "4", "--dtype", "fp32", "--context-dir", str(root),
            "--max-len", "300", "--no-compile", "# the answer:"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "context: 3 files" in err and "did not fit: README.md" in err and "left out 2 binary" in err
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompt = tok.encode("# the answer:")
    packed = pack_tree(root, tok, budget=299 - len(prompt) - 4)
    assert prompts[-1] == packed.ids + prompt and len(prompts[-1]) + 4 <= 300


def test_server_takes_a_prompt_far_beyond_the_default_context(ckpt):
    """A 20K-token prompt through the HTTP API (the long-context prefill path: blocked scan and attention)."""
    import httpx

    from tests.serve_util import API_KEY, MODEL, Server

    server = Server(ckpt, "--max-len", "24576", "--max-batch", "1")
    try:
        ids = torch.randint(3, 512, (20000,), generator=torch.Generator().manual_seed(0)).tolist()
        r = httpx.post(server.url + "/v1/completions", timeout=600, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 20000
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
