"""Engram: the published compression and hashing with hand-worked values, an independent numpy twin of the demo's
hashing, the module against a per-stream loop, incremental decoding against the full forward, sparse training that
leaves untouched rows (and their optimizer state) bit for bit, checkpoints."""

import math
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models

from dsv4 import ModelArgs, Transformer
from dsv4.model.cache import KVCache
from dsv4.model.engram import compress_vocab, engram_hashes, hash_rows, is_prime, table_sizes, token_key
from tests.helpers import random_ids, randomize, tiny_args
from tests.test_cache import run_steps


# ---- compression ----------------------------------------------------------------------------------------------------
def byte_level_tokenizer(tokens: list[str]) -> RustTokenizer:
    """A byte-level BPE whose vocabulary is exactly `tokens` (spelled in the byte-level alphabet), in id order."""
    tok = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.decoder = decoders.ByteLevel()
    return tok


def test_token_keys_by_hand():
    assert token_key("Hello", None) == "hello"
    assert token_key(" hello", None) == "hello"  # stripped
    assert token_key("\n\n", None) == " "  # a whitespace-only token is one protected space
    assert token_key("\t \r", None) == " "
    assert token_key("É", None) == "e"  # NFD + strip accents + lowercase
    assert token_key("\ufb01", None) == "fi"  # NFKC unfolds the ligature
    assert token_key("a  \t b ", None) == "a b"  # runs collapse
    assert token_key("\ufffd", "Ã") == "Ã"  # a byte fragment: keyed by its raw token string
    assert token_key("", None) == ""


def test_compress_vocab_by_hand():
    # byte-level spellings: Ġ = space, Ċ = newline, Ã = byte 0xC3 (alone: invalid UTF-8), Ã© = é, ï¬ģ = the ligature fi
    tokens = ["Hello", "Ġhello", "ĊĊ", "Ġ", "Ã", "Ã©", "e", "ï¬ģ", "fi", "Ã¨"]
    lookup = compress_vocab(byte_level_tokenizer(tokens))
    #   hello hello  " "  " "  Ã    e    e   fi   fi   e (è)
    assert lookup.tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 3]
    # ids past the tokenizer decode to '' and share one id
    assert compress_vocab(byte_level_tokenizer(tokens), vocab_size=12).tolist()[-2:] == [5, 5]


def test_compress_our_tokenizer_merges_case_and_space_variants():
    from dsv4.tokenizers.text import Tokenizer

    tok = Tokenizer.train(["def hello(self):\n    return Hello + HELLO + hello\n" * 50, "naïve café\n" * 20], 420)
    lookup = compress_vocab(tok)
    ids = {t: tok.token_id(t) for t in ("hello", "Hello", "Ġhello", "ĠHello") if t in tok.tok.get_vocab()}
    assert len(ids) >= 3 and len({int(lookup[i]) for i in ids.values()}) == 1
    assert lookup.max() + 1 < tok.vocab_size  # something merged
    assert lookup[tok.pad_id] != lookup[tok.bos_id]  # special tokens keep their own ids


# ---- hashing --------------------------------------------------------------------------------------------------------
def test_primes_and_table_sizes_by_hand():
    assert [n for n in range(40) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    assert is_prime(2 ** 61 - 1) and not is_prime(2 ** 61 + 1) and not is_prime(3215031751)  # a strong pseudoprime
    # each (layer, order) searches from its configured size, skipping every prime taken before
    assert table_sizes([1, 2], 3, 2, [10, 10]) == {1: [[11, 13], [17, 19]], 2: [[23, 29], [31, 37]]}
    assert table_sizes([0], 3, 1, [11, 20]) == {0: [[11], [23]]}  # a prime configured size is taken as is


def test_hash_rows_by_hand():
    mults, primes = torch.tensor([3, 5, 7]), torch.tensor([[13, 17], [19, 23]])
    rows = hash_rows(torch.tensor([[5, 7, 11]]), mults, primes, pad=2)
    # position 0: 5*3 ^ 2*5 = 15 ^ 10 = 5;   then ^ 2*7: 5 ^ 14 = 11
    # position 1: 7*3 ^ 5*5 = 21 ^ 25 = 12;  12 ^ 14 = 2
    # position 2: 11*3 ^ 7*5 = 33 ^ 35 = 2;  2 ^ 5*7 = 2 ^ 35 = 33 -> 33 mod 19 = 14, mod 23 = 10
    assert rows.tolist() == [[[5, 5, 11, 11], [12, 12, 2, 2], [2, 2, 14, 10]]]
    # the same positions continued from a context instead of the pad
    tail = hash_rows(torch.tensor([[11]]), mults, primes, pad=2, context=torch.tensor([[5, 7]]))
    assert tail.tolist() == [[[2, 2, 14, 10]]]


def test_hash_products_wrap_and_rows_are_non_negative():
    m = 2 ** 62 + 1  # odd; 3 m = 2^63 + 2^62 + 3 wraps to -2^62 + 3, 4 m = 2^64 + 4 wraps to 4
    rows = hash_rows(torch.tensor([[3]]), torch.tensor([m, m]), torch.tensor([[13, 10007]]), pad=4)
    mix = (-(2 ** 62) + 3) ^ 4  # = -2^62 + 7: negative, and Python's % makes the row non-negative
    assert mix == -(2 ** 62) + 7
    assert rows.tolist() == [[[mix % 13, mix % 10007]]]
    assert all(r >= 0 for r in rows.flatten().tolist())


def demo_hashes(ids: np.ndarray, layer: int, seed: int, max_ngram: int, vocab: int, primes, pad: int) -> np.ndarray:
    """The published algorithm written out in numpy from its description: shifts padded with the pad id, products
    of int64 arrays (which wrap), XOR, mod per head."""
    half = max(1, int(np.iinfo(np.int64).max // vocab) // 2)
    mult = np.random.default_rng(seed + 10007 * layer).integers(0, half, size=(max_ngram,), dtype=np.int64) * 2 + 1
    T = ids.shape[1]
    shifts = [np.pad(ids, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(max_ngram)]
    out = []
    for n in range(2, max_ngram + 1):
        mix = shifts[0] * mult[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * mult[k])
        out += [mix % p for p in primes[n - 2]]
    return np.stack(out, axis=2)


@pytest.mark.parametrize("max_ngram,heads,vocab,seed", [(3, 4, 50_000, 0), (4, 2, 129_280, 7), (2, 8, 1_000, 3)])
def test_hashing_matches_the_published_algorithm(max_ngram, heads, vocab, seed):
    layers = [1, 14]  # V4.1-Flash's
    sizes = table_sizes(layers, max_ngram, heads, [5 * vocab] * (max_ngram - 1))
    args = ModelArgs.from_name("tiny", vocab_size=vocab, n_layers=15, compress_ratios=[0] * 16, engram_layers=layers,
                               engram_max_ngram=max_ngram, engram_heads=heads,
                               engram_vocab=[5 * vocab] * (max_ngram - 1), engram_dim=8 * heads, engram_seed=seed)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(3, 40), dtype=np.int64)
    ids[0, :3] = vocab - 1  # the largest products the multipliers' bound allows
    hashes = engram_hashes(args)
    for layer in layers:
        h = hashes[layer]
        assert h.primes == sizes[layer] and all(m % 2 == 1 for m in h.mults)
        got = h.rows(torch.from_numpy(ids), pad=2, offset=False).numpy()
        np.testing.assert_array_equal(got, demo_hashes(ids, layer, seed, max_ngram, vocab, sizes[layer], pad=2))
        assert torch.equal(h.rows(torch.from_numpy(ids), pad=2) - torch.from_numpy(got),
                           torch.tensor(h.offsets).expand(*got.shape))


# ---- the module -----------------------------------------------------------------------------------------------------
def engram_model(seed: int = 0, conv: bool = True, **overrides) -> Transformer:
    """tiny + Engram at layers 1 (CSA) and 2 (HCA), small tables (97 rows per head: collisions happen)."""
    args = tiny_args(**overrides).with_engram(layers=[1, 2], vocab=97, conv=conv)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return randomize(model, seed).eval()


def loop_engram(block, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The module written per stream, as the demo writes it: one key projection and two norms per stream, then the
    convolution over the concatenated streams, padded as PyTorch's Conv1d pads."""
    eng = block.engram
    e = eng.table(rows).flatten(-2)
    n, D = eng.n, eng.dim
    kw, kb = eng.key.weight.view(n, D, -1), eng.key.bias.view(n, D)

    def norm(x, w):
        return w * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + block.attn_norm.eps)

    gates = []
    for i in range(n):
        k = norm(e @ kw[i].T + kb[i], eng.key_norm.weight[i])
        q = norm(h[:, :, i], eng.query_norm.weight[i])
        g = (k * q).sum(-1) / math.sqrt(D)
        gates.append(torch.sigmoid(g.abs().clamp_min(1e-6).sqrt() * g.sign()))
    u = torch.stack(gates, 2).unsqueeze(-1) * (e @ eng.value.weight.T + eng.value.bias).unsqueeze(2)
    if eng.conv is None:
        return h + u
    x = torch.cat([norm(u[:, :, i], eng.conv_norm.weight[i]) for i in range(n)], -1).transpose(1, 2)
    y = torch.nn.functional.conv1d(x, eng.conv.weight, groups=n * D, dilation=eng.dilation,
                                   padding=(eng.kernel - 1) * eng.dilation)  # Conv1d's padded, both sides
    y = torch.nn.functional.silu(y[..., : h.shape[1]]).transpose(1, 2)
    return h + u + y.view_as(u)


@pytest.mark.parametrize("conv", [True, False])
@torch.no_grad()
def test_module_equals_a_per_stream_loop(conv):
    model = engram_model(conv=conv)
    ids = random_ids(model.args, 2, 30, seed=5)
    rows = model.engram_rows(ids)[1]
    h = torch.randn(2, 30, model.args.hc_mult, model.args.dim)
    block = model.layers[1]
    torch.testing.assert_close(block.engram(h, rows)[0], loop_engram(block, h, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [True, False])
def test_module_gradients_equal_the_per_stream_loop(conv):
    """In fp64, every parameter's gradient (the table's a sparse one) and the streams' equal the loop's autograd."""
    model = engram_model(conv=conv).double()
    ids = random_ids(model.args, 2, 30, seed=6)
    rows = model.engram_rows(ids)[1]
    block = model.layers[1]
    h = torch.randn(2, 30, model.args.hc_mult, model.args.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn_like(h)
    grads = []
    for f in (lambda: block.engram(h, rows)[0], lambda: loop_engram(block, h, rows)):
        block.zero_grad(set_to_none=True)
        h.grad = None
        (f() * w).sum().backward()
        grads.append({"h": h.grad, **{k: p.grad.to_dense() if p.grad.is_sparse else p.grad
                                      for k, p in block.engram.named_parameters()}})
    assert block.engram.table.weight.grad is not None
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-9, rtol=1e-7, msg=k)


def test_kernels_equal_their_plain_twins():
    """dsv4.kernels.engram against the formulas autograd differentiates (fp64: gradcheck, and values and gradients
    against RMSNorm-then-product, F.conv1d over the padded sequence, F.embedding(sparse=True) coalesced)."""
    from dsv4.kernels.engram import causal_conv, gate_logit, lookup
    from dsv4.train.optim import coalesced

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    h, k, w = rand(2, 7, 3, 5), rand(2, 7, 3, 5), rand(3, 5)
    assert torch.autograd.gradcheck(lambda h, k, w: gate_logit(h, k, w, 1e-6), (h, k, w))

    def rms(x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)

    torch.testing.assert_close(gate_logit(h, k, w, 1e-6), (rms(h) * rms(k) * w).sum(-1) / math.sqrt(5))
    for S, dilation, with_past in ((11, 3, False), (11, 3, True), (2, 3, False), (9, 1, True)):
        x, c = rand(2, S, 6), rand(6, 4)
        past = torch.randn(2, 3 * dilation, 6, generator=g, dtype=torch.float64) if with_past else None
        assert torch.autograd.gradcheck(lambda x, c, d=dilation, p=past: causal_conv(x, c, d, p), (x, c))
        padded = torch.cat([past if with_past else x.new_zeros(2, 3 * dilation, 6), x], 1)
        plain = torch.nn.functional.conv1d(padded.transpose(1, 2), c.unsqueeze(1), dilation=dilation, groups=6)
        torch.testing.assert_close(causal_conv(x, c, dilation, past), plain.transpose(1, 2))
    with pytest.raises(ValueError, match="takes no gradient"):
        causal_conv(x, c, 1, rand(2, 3, 6))
    table, rows = rand(20, 4), torch.randint(0, 20, (3, 5, 2), generator=g)
    grads = []
    for f in (lookup, lambda t, r: torch.nn.functional.embedding(r, t, sparse=True)):
        table.grad = None
        out = f(table, rows)
        (out * torch.arange(4.0, dtype=torch.float64)).pow(2).sum().backward()
        grads.append(table.grad)
    assert torch.equal(grads[0]._indices()[0], rows.unique())  # one entry per row read, in order: coalesced
    torch.testing.assert_close(grads[0].to_dense(), grads[1].to_dense())
    for grad in grads:  # the trainer's check: sorted distinct rows are taken as they are, others coalesced
        done = coalesced(grad)
        assert done.is_coalesced() and (done is grad) == (grad is grads[0])
        torch.testing.assert_close(done.to_dense(), grads[1].to_dense())
    torch.testing.assert_close(lookup(table, rows), table[rows])


@torch.no_grad()
def test_rows_depend_only_on_the_last_n_tokens():
    model = engram_model()
    N = model.args.engram_max_ngram
    ids = random_ids(model.args, 1, 40, seed=1)
    base = model.engram_rows(ids)
    for p in (0, 7, 39):
        changed = ids.clone()
        changed[0, p] = (changed[0, p] + 1) % model.args.vocab_size
        while model.engram_ids[changed[0, p]] == model.engram_ids[ids[0, p]]:  # a different compressed id
            changed[0, p] = (changed[0, p] + 1) % model.args.vocab_size
        for layer, rows in model.engram_rows(changed).items():
            moved = (rows != base[layer]).any(-1)[0]
            assert not moved[:p].any() and not moved[p + N:].any(), (layer, p)
            assert moved[p]  # the unigram position itself always re-hashes (order 2 reads it with factor m_0)


@pytest.mark.parametrize("conv", [True, False])
@torch.no_grad()
def test_decoding_equals_the_full_forward(conv):
    model = engram_model(conv=conv)
    W = model.args.window_size
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        L = int(torch.randint(2, 3 * W + 9, (1,), generator=g))
        chunks, left = [], L
        while left:
            chunks.append(int(torch.randint(1, min(left, 7) + 1, (1,), generator=g)) if trial % 2 else
                          min(left, int(torch.randint(1, L + 1, (1,), generator=g))))
            left -= chunks[-1]
        ids = random_ids(model.args, 1, L, seed=trial)
        cache = KVCache(model.args, slots=2, max_len=max(L, 11) + 3)
        run_steps(model, cache, random_ids(model.args, 1, 11, seed=50), [11], slot=1)  # a predecessor in the slot
        torch.testing.assert_close(run_steps(model, cache, ids, chunks, slot=1), model(ids).float(),
                                   atol=1e-4, rtol=0)


@torch.no_grad()
def test_rejected_columns_do_not_disturb_the_memory():
    """Steps of 3 columns committing 1-3 of them (speculative drafts), rows of a batch at different positions."""
    model = engram_model()
    total = 50
    seqs = [random_ids(model.args, 1, total, seed=i + 20) for i in range(2)]
    cache = KVCache(model.args, slots=2, max_len=total + 4)
    pos = torch.tensor([4, 9])
    for i in range(2):
        run_steps(model, cache, seqs[i], [int(pos[i])], slot=i)
    got = [[], []]
    g = torch.Generator().manual_seed(1)
    while int(pos.max()) + 3 <= total:
        commit = torch.randint(1, 4, (2,), generator=g)
        ids = torch.stack([seqs[i][0, p: p + 3] for i, p in enumerate(pos.tolist())])
        logits = model.logits(model.step(ids, cache, model.make_step(cache, torch.arange(2), pos, 3, commit))).float()
        for i in range(2):
            got[i].append(logits[i, : int(commit[i])])
        pos = pos + commit
    for i, start in enumerate((4, 9)):
        full = model(seqs[i][:, : int(pos[i])]).float()[0, start:]
        torch.testing.assert_close(torch.cat(got[i]), full, atol=1e-4, rtol=0)


def test_engram_args_are_checked():
    with pytest.raises(ValueError, match="engram_layers must be distinct main layers"):
        tiny_args().with_engram(layers=[4])
    with pytest.raises(ValueError, match="engram_dim .* multiple of engram_heads"):
        tiny_args().with_engram(dim=30, heads=4)
    with pytest.raises(ValueError, match="one table size >= 2 per order 2..4"):
        tiny_args().with_engram(max_ngram=4, vocab=[100, 100])
    with pytest.raises(ValueError, match="engram_max_ngram must be >= 2"):
        tiny_args().with_engram(max_ngram=1, vocab=[])
    model = engram_model()
    with pytest.raises(ValueError, match="must map each of the 512 token ids"):
        model.set_engram_vocab(list(range(10)))


# ---- training -------------------------------------------------------------------------------------------------------
def test_training_touches_only_the_rows_it_read():
    from dsv4.train.optim import build_optimizer, clip_grad_norm

    model = engram_model()
    model.train()
    assert [g["lr"] for g in build_optimizer(model, "muon", lr=1e-2, memory_lr=3e-2).sparse.param_groups] == [3e-2]
    opt = build_optimizer(model, "muon", lr=1e-2)  # the tables at the lr of the rest (--memory-lr not given)
    assert [g["lr"] for g in opt.sparse.param_groups] == [1e-2]
    assert opt.sparse is not None and [p for g in opt.sparse.param_groups for p in g["params"]] == [
        model.layers[1].engram.table.weight, model.layers[2].engram.table.weight]
    tables = [model.layers[i].engram.table.weight for i in (1, 2)]
    read = [torch.zeros(t.shape[0], dtype=torch.bool) for t in tables]
    for step in range(3):
        ids = random_ids(model.args, 2, 24, seed=step)
        rows = model.engram_rows(ids)
        for flag, layer in zip(read, (1, 2)):
            flag[rows[layer].flatten()] = True
        before = [t.detach().clone() for t in tables]
        state = [{k: v.clone() for k, v in opt.sparse.state[t].items() if torch.is_tensor(v)}
                 if t in opt.sparse.state else None for t in tables]
        opt.zero_grad()
        model(ids).float().square().mean().backward()
        assert all(t.grad.is_sparse for t in tables)
        clip_grad_norm([p for p in model.parameters()], 1e-3)  # clipping scales the sparse grads too
        opt.step()
        for t, old, st, flag in zip(tables, before, state, read):
            untouched = ~flag
            assert untouched.any() and flag.any()
            assert torch.equal(t.detach()[untouched], old[untouched])  # bit for bit
            assert not torch.equal(t.detach()[flag], old[flag])
            if st is not None:
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(opt.sparse.state[t][k][untouched], st[k][untouched])
            flag.zero_()


def test_clip_counts_a_row_read_twice_once():
    from dsv4.train.optim import clip_grad_norm

    table = torch.nn.Embedding(10, 3, sparse=True)
    table(torch.tensor([4, 4, 7])).sum().backward()  # row 4 twice: its gradient is 2 per element
    dense = torch.nn.Parameter(torch.zeros(2))
    dense.grad = torch.tensor([3.0, 0.0])
    norm = clip_grad_norm([table.weight, dense], 1.0)
    assert norm == pytest.approx(math.sqrt(3 * 2 ** 2 + 3 * 1 ** 2 + 3 ** 2))
    g = table.weight.grad.to_dense()
    torch.testing.assert_close(g[4], torch.full((3,), 2.0 / norm))
    torch.testing.assert_close(dense.grad, torch.tensor([3.0 / norm, 0.0]))


# ---- checkpoints ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_checkpoint_round_trip_keeps_the_memory(tmp_path):
    from dsv4.weights.checkpoint import from_pretrained, save_pretrained

    model = engram_model()
    lookup = torch.arange(model.args.vocab_size) // 2  # a compression: pairs of ids share one
    args = ModelArgs.from_dict({**model.args.to_dict(), "engram_compressed_vocab": model.args.vocab_size // 2})
    compressed = Transformer(args)
    compressed.load_state_dict(model.state_dict(), strict=False)
    compressed.init_rope()
    compressed.set_engram_vocab(lookup)
    compressed.eval()
    ids = random_ids(args, 2, 33, seed=2)
    save_pretrained(compressed, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.args == args and torch.equal(loaded.engram_ids, lookup)
    assert loaded.layers[1].engram.table.weight.dtype == torch.float32
    torch.testing.assert_close(loaded(ids), compressed(ids), atol=0, rtol=0)
    assert not torch.equal(loaded(ids), model(ids))  # the compression changed the rows read


def test_an_engram_run_resumes_exactly(tmp_path):
    """The pipeline with --engram: the compression saved with the checkpoint, RowAdam's state in the snapshots,
    and a run resumed from a middle snapshot continues with exactly the uninterrupted run's losses."""
    import shutil
    import sysconfig

    from dsv4.train.config import StageConfig, TrainConfig
    from dsv4.train.pipeline import run
    from dsv4.train.plots import read_metrics
    from dsv4.weights.tensors import read_tensor

    data = tmp_path / "corpus"
    data.mkdir()
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "fnmatch.py"):
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), data / name)

    def config(out):
        return TrainConfig(out=str(out), preset="tiny", data=str(data), val_frac=0.3, dtype="fp32", device="cpu",
                           compile="off", engram={"vocab": 300},
                           pretrain=StageConfig(steps=8, batch_size=2, seq_len=64, warmup=3, eval_every=4,
                                                save_every=4),
                           sft=StageConfig(steps=0))

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "pretrain" / "metrics.jsonl")]

    final = run(config(tmp_path / "full"), progress=False)
    lookup = read_tensor(final, "engram_ids")
    args = ModelArgs.from_hf_config(final)
    assert args.engram_layers == [1] and int(lookup.max()) + 1 == args.compressed_vocab < args.vocab_size
    cut = tmp_path / "cut"
    run(config(cut), progress=False)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "pretrain" / "step-000000008")  # as if killed after step 4's snapshot
    run(config(cut), resume=True, progress=False)
    assert losses(cut) == losses(tmp_path / "full") and len(losses(cut)) == 8


@torch.no_grad()
def test_a_compiled_inference_step_gathers_the_rows_in_its_graph():
    """Compiled and without gradients, the lookup is a plain gather inside the graph (fullgraph: a break would make
    a compiled decode step of an Engram model fall back to one graph per block); it reads what the sparse-gradient
    lookup reads."""
    engram = engram_model().layers[1].engram
    rows = torch.randint(0, engram.table.weight.shape[0], (2, 5, 4))
    assert torch.equal(torch.compile(engram.lookup, fullgraph=True, dynamic=False)(rows), engram.lookup(rows))
