"""Model behaviour: fast paths equal their plain twins, building on meta, MTP wiring, input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4 import PRESETS, ModelArgs, Transformer
from dsv4.kernels.topk import topk_recent
from dsv4.model.attention import window_keys, window_scores
from dsv4.model.compressor import Compressor
from dsv4.model.moe import Experts
from dsv4.model.rope import apply_rope, rope_inv_freq
from dsv4.model.stats import LayerStats, TrainStats
from tests.helpers import random_ids, random_model, tiny_args


@pytest.mark.parametrize("S,W", [(1, 4), (5, 4), (8, 4), (37, 8), (130, 16)])
@pytest.mark.parametrize("offset", ["zero", "int", "rows"])
def test_window_scores_match_dense_mask(S, W, offset):
    """Queries at positions start.. against keys start-W..; start 0, a later int, or different per row."""
    g = torch.Generator().manual_seed(S)
    starts = {"zero": [0, 0], "int": [W + 3, W + 3], "rows": [2, 2 * W + 1]}[offset]
    total = max(starts) + S
    q, kv = torch.randn(2, S, 3, 8, generator=g), torch.randn(2, total, 8, generator=g)
    keys = torch.stack([window_keys(kv[b: b + 1], st, st + S, W)[0] for b, st in enumerate(starts)])
    start = torch.tensor(starts) if offset == "rows" else starts[0]
    logits, _ = window_scores(q, keys, W, start)
    dense = torch.einsum("bshd,btd->bsht", q, kv)  # [B, S, H, total]
    for b, st in enumerate(starts):
        for i in range(S):
            t = st + i
            row = logits[b, i]  # [H, 2W]
            if S <= W:  # one block: the W + S keys of positions st-W ..
                key_pos = st - W + torch.arange(W + S)
            else:  # positions of the 2W slots of i's block
                key_pos = st + (i // W) * W - W + torch.arange(2 * W)
            finite = torch.isfinite(row[0])
            assert torch.isfinite(row).eq(finite).all()
            assert sorted(key_pos[finite].tolist()) == list(range(max(0, t - W + 1), t + 1))
            torch.testing.assert_close(row[..., finite], dense[b, i][..., key_pos[finite]])


def naive_compress(comp: Compressor, x, cos, sin):
    """Loop-based twin of Compressor.forward, written from the formula."""
    B, S, _ = x.shape
    m, d = comp.ratio, comp.head_dim
    kv = x.float() @ comp.wkv.weight.float().t()
    z = x.float() @ comp.wgate.weight.float().t()
    out = []
    for i in range(S // m):
        slots_kv, slots_z = [], []
        for j in range(m):
            t = i * m + j
            if comp.overlap:
                if i > 0:
                    tp = (i - 1) * m + j
                    slots_kv.append(kv[:, tp, :d])
                    slots_z.append(z[:, tp, :d] + comp.ape[j, :d])
            else:
                slots_kv.append(kv[:, t])
                slots_z.append(z[:, t] + comp.ape[j])
        if comp.overlap:
            for j in range(m):
                t = i * m + j
                slots_kv.append(kv[:, t, d:])
                slots_z.append(z[:, t, d:] + comp.ape[j, d:])
        w = torch.stack(slots_z, 1).softmax(1)
        e = (w * torch.stack(slots_kv, 1)).sum(1)
        e = e * torch.rsqrt(e.square().mean(-1, keepdim=True) + 1e-6) * comp.norm.weight
        out.append(apply_rope(e, cos[i * m], sin[i * m]))
    return torch.stack(out, 1) if out else x.new_zeros(B, 0, d)


@pytest.mark.parametrize("overlap,S", [(False, 3), (False, 17), (True, 4), (True, 23)])
def test_compressor_matches_loop_twin(overlap, S):
    torch.manual_seed(0)
    comp = Compressor(16, 8, 4, overlap=overlap, eps=1e-6)
    torch.nn.init.normal_(comp.ape)
    torch.nn.init.normal_(comp.norm.weight)
    args = tiny_args(rope_head_dim=4, head_dim=32)
    inv = rope_inv_freq(args, 1e4, yarn=False)
    ang = torch.arange(S)[:, None].float() * inv
    x = torch.randn(2, S, 16)
    got = comp(x, ang.cos(), ang.sin())
    want = naive_compress(comp, x, ang.cos(), ang.sin())
    assert got.shape == (2, S // 4, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_tie_break_prefers_recent():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    assert topk_recent(scores, 3).tolist() == [[2, 4, 3]]
    # without ties it is plain top-k
    s = torch.randn(50, 40)
    assert torch.equal(topk_recent(s, 7).sort(-1).values, s.topk(7).indices.sort(-1).values)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_experts_match_dense_twin(dtype, tol):
    args = tiny_args(n_routed_experts=8, n_activated_experts=3, moe_inter_dim=32, dim=64)
    torch.manual_seed(0)
    ex = Experts(args)
    ex.reset_parameters(0.1)
    ex.to(dtype)
    for trial in range(6):
        N = [1, 5, 64, 257, 0, 2][trial]  # 1 token (3 of 8 experts) is gathered, the others grouped
        x = torch.randn(N, 64).to(dtype)
        idx = torch.rand(N, 8).argsort(-1)[:, :3]
        w = torch.rand(N, 3)
        assert ex.grouped_ok(x)
        got, want = ex(x, w, idx), ex.forward_dense(x, w, idx)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_grouped_experts_gradients_match_dense_twin():
    args = tiny_args(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16, dim=32)
    ex = Experts(args)
    ex.reset_parameters(0.1)
    x = torch.randn(40, 32, requires_grad=True)
    idx, w = torch.rand(40, 4).argsort(-1)[:, :2], torch.rand(40, 2)
    grads = []
    for fn in (ex.forward, ex.forward_dense):
        ex.zero_grad()
        x.grad = None
        (fn(x, w, idx) * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append((x.grad.clone(), ex.w13.grad.clone(), ex.w2.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mtp_logits_are_separate_and_shaped():
    model = random_model(n_mtp_layers=2, compress_ratios=[0, 4, 16, 4, 0, 4])
    ids = random_ids(model.args, 2, 21)
    with torch.no_grad():
        plain = model(ids)
        logits, mtp = model(ids, mtp=True)
    torch.testing.assert_close(plain, logits)
    assert [t.shape for t in mtp] == [(2, 20, 512), (2, 19, 512)]
    assert not torch.allclose(mtp[0][:, :19], logits[:, 1:20])


def test_mtp_is_causal():
    """MTP row i may depend on tokens <= i+1+j only."""
    model = random_model()
    ids = random_ids(model.args, 1, 24)
    ids2 = ids.clone()
    ids2[0, 15] = (ids2[0, 15] + 1) % model.args.vocab_size
    with torch.no_grad():
        _, (a,) = model(ids, mtp=True)
        _, (b,) = model(ids2, mtp=True)
    torch.testing.assert_close(a[:, :14], b[:, :14])  # rows 0..13 see tokens <= 14
    assert not torch.allclose(a[:, 14], b[:, 14])


def test_main_model_is_causal_across_all_layer_kinds():
    model = random_model()
    ids = random_ids(model.args, 2, 70)
    ids2 = ids.clone()
    ids2[:, 50:] = random_ids(model.args, 2, 20, seed=5)
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :50], b[:, :50])
    assert not torch.allclose(a[:, 50:], b[:, 50:])


def test_out_of_range_ids_raise_clear_error():
    model = random_model()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\); got ids in \[0, 512\]"):
        model(torch.tensor([[0, 512]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


def test_bf16_forward_close_to_fp32():
    model = random_model()
    ids = random_ids(model.args, 1, 40)
    with torch.no_grad():
        ref = model(ids)
        model.to_dtype(torch.bfloat16)
        got = model(ids)
    assert model.layers[0].hc_attn.fn.dtype == torch.float32
    assert model.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    # bf16 rounding (and the odd router flip it causes) moves logits a little, not a lot
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.1, rel


def test_fast_topk_selects_the_same_set_as_the_sorting_twin():
    from dsv4.kernels.topk import topk_recent_fast

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        T, k = int(torch.randint(2, 300, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        k = min(k, T)
        s = torch.randn(3, 17, T, generator=g)
        if trial % 3 == 0:  # many exact ties, as ReLU scores produce
            s = torch.where(torch.rand(s.shape, generator=g) < 0.6, torch.zeros_like(s), s)
        if trial % 3 == 1:  # quantised scores: ties everywhere
            s = (s * 2).round()
        a = topk_recent_fast(s, k).sort(-1).values
        b = topk_recent(s, k).sort(-1).values
        assert torch.equal(a, b), trial


@pytest.mark.parametrize("layer", [0, 1, 2])  # swa, csa, hca
def test_attention_in_query_blocks_equals_one_block(layer):
    model = random_model()
    attn, kind = model.layers[layer].attn, model.layers[layer].kind
    x = torch.randn(2, 203, model.args.dim)
    rope = model.rope(kind, torch.arange(203))
    with torch.no_grad():
        whole = attn(x, rope, block=4096)
        for block in (16, 48, 100):  # multiples of the window and not (rounded down to whole windows)
            torch.testing.assert_close(attn(x, rope, block=block), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_hot_paths_match_eager():
    """The opt-in torch.compile fast path computes what the eager code computes."""
    import copy

    from dsv4.kernels.compile import compile_hot_paths

    model = random_model()
    ids = random_ids(model.args, 2, 70)
    fast = compile_hot_paths(copy.deepcopy(model))
    with torch.no_grad():
        want = model(ids)
        got = fast(ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_aux_loss_free_bias_evens_out_a_skewed_router():
    from dsv4.model.moe import MoE
    from dsv4.train.trainer import update_balance_bias

    args = tiny_args(n_routed_experts=8, n_activated_experts=2, n_hash_layers=0)
    moe = MoE(args, layer_id=1).train()
    moe.gate.reset_parameters(0.02)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.5  # experts 0 and 1 win for most tokens
    x = torch.randn(4, 64, args.dim).abs()

    def load():
        stats = LayerStats()
        with torch.no_grad():
            moe(x, stats=stats)
        return stats.load

    def imbalance():
        return (load().max() / load().mean()).item()

    before = imbalance()
    for _ in range(300):
        update_balance_bias(moe.gate, load(), gamma=0.01)
    after = imbalance()
    assert before > 3.0 and after < 1.5, (before, after)
    # the bias only selects: routing weights still come from the scores alone
    w, idx, s = moe.gate(x.view(-1, args.dim), None)
    torch.testing.assert_close(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * args.route_scale)


def test_sequence_balance_loss_is_minimal_when_balanced():
    from dsv4.model.moe import sequence_balance

    # uniform scores, perfectly balanced assignments: f_i = 1, P_i = 1/E -> loss = 1
    idx = torch.arange(8).remainder(4).view(8, 1)
    torch.testing.assert_close(sequence_balance(idx, torch.ones(8, 4), batch=1), torch.tensor(1.0))
    # everything on expert 0 with all the score mass there: f_0 = 4, P_0 = 1 -> loss = 4
    scores = torch.zeros(8, 4)
    scores[:, 0] = 1
    torch.testing.assert_close(sequence_balance(torch.zeros(8, 1, dtype=torch.long), scores, batch=1),
                               torch.tensor(4.0))


def test_indexer_kl_is_zero_iff_the_indexer_matches_the_attention():
    from dsv4.model.indexer import indexer_kl

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 3, 6, generator=g)  # [B, s, H, T]
    target = probs.sum(2) / probs.sum((2, 3))[..., None]
    kl, n = indexer_kl(target.log(), probs, None)
    assert int(n) == 10 and abs(kl.item()) < 1e-5
    kl, _ = indexer_kl(torch.randn(2, 5, 6, generator=g), probs, None)
    assert kl.item() > 0.01
    # invisible entries (-inf) and rows with nothing visible are skipped, not NaN
    scores = torch.full((1, 2, 6), float("-inf"))
    scores[0, 1, :2] = 0.0
    p = torch.zeros(1, 2, 3, 6)
    p[0, 1, :, :2] = 0.25
    kl, n = indexer_kl(scores, p, None)
    assert int(n) == 1 and abs(kl.item()) < 1e-6


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_training_stages(stage):
    model = random_model(compress_ratios=[4, 4, 0, 4, 0]).train()
    ids = random_ids(model.args, 2, 97)
    with torch.no_grad():
        model.eval()
        ref = model(ids)
        model.train()
    stats = TrainStats(indexer=stage)
    logits = model(ids, stats=stats)
    kls = list(stats.collect("indexer_kl").values())
    assert len(kls) == 3 and all(torch.isfinite(k) and k > 0 for k in kls)
    if stage == "sparse":  # top-k attention as in inference; the KL reaches only the indexer
        torch.testing.assert_close(logits, ref)
        sum(kls).backward()
        attn = model.layers[0].attn
        assert attn.wq_a.weight.grad is None and model.embed.weight.grad is None
        assert attn.indexer.wq_b.weight.grad.abs().sum() > 0
        assert attn.indexer.compressor.wkv.weight.grad.abs().sum() > 0
    else:  # dense warm-up attends to every visible entry: different logits once entries outnumber index_topk
        assert not torch.allclose(logits, ref)


@pytest.mark.parametrize("stage", [None, "sparse"])
def test_csa_dense_masked_path_equals_the_gather_path(stage, monkeypatch):
    """With few compressed entries CSA scores all of them and masks the unselected; that must be the top-k gather's
    attention exactly: same logits, same gradients, same indexer KL (entries: 24 per sequence, top-k 8 and 64 below
    and above it, so some queries see fewer entries than k)."""
    from dsv4.model.attention import Attention

    results = []
    for dense_select in (0, 10 ** 6):  # 0: always gather; huge: always dense
        monkeypatch.setattr(Attention, "DENSE_SELECT", dense_select)
        model = random_model(compress_ratios=[4, 4, 0, 4, 0], index_topk=8).train()
        stats = TrainStats(indexer=stage)
        ids = random_ids(model.args, 2, 97)
        logits = model(ids, stats=stats)
        kl = sum(stats.collect("indexer_kl").values()) if stage else 0
        (logits.float().square().mean() + kl).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), float(kl.detach()) if stage else 0.0, grads))
    (a, kl_a, ga), (b, kl_b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert abs(kl_a - kl_b) <= 1e-5 * max(1.0, abs(kl_a))
    assert ga.keys() == gb.keys() and any("indexer" in n for n in ga) == (stage is not None)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_train_stats_report_every_block_and_leave_the_plain_forward_alone():
    """With the indexer untrained a training forward computes the plain forward's logits; every block (MTP included)
    reports its expert load, summing to tokens x experts per token; the indexer's KL comes from CSA layers only."""
    model = random_model()
    ids = random_ids(model.args, 2, 40)
    with torch.no_grad():
        plain, plain_mtp = model(ids, mtp=True)
        stats = TrainStats(balance=True)
        logits, mtp = model(ids, mtp=True, stats=stats)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(mtp[0], plain_mtp[0], rtol=0, atol=0)
    n_blocks = model.args.n_layers + model.args.n_mtp_layers
    assert sorted(stats.collect("load")) == sorted(stats.collect("seq_balance")) == list(range(n_blocks))
    K = model.args.n_activated_experts
    assert [int(load.sum()) for load in stats.collect("load").values()] == [2 * 40 * K] * 4 + [2 * 39 * K]
    assert not stats.collect("indexer_kl")
    sparse = TrainStats(indexer="sparse")
    model(ids, stats=sparse)
    assert sorted(sparse.collect("indexer_kl")) == [i for i, b in enumerate(model.layers) if b.kind == "csa"]
    with pytest.raises(ValueError, match="indexer stage"):
        TrainStats(indexer="warmup")
