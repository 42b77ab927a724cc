import copy

import pytest
import torch
from torch import nn

from dsv4.config import ModelArgs
from dsv4.device import has_fused_adamw
from dsv4.model.transformer import Transformer
from dsv4.train.optim import (
    Muon,
    RowAdam,
    build_optimizer,
    clip_grad_norm,
    cosine_schedule,
    muon_scale,
    newton_schulz,
    param_groups,
    param_kind,
    polar_reference,
    set_lr,
    wsd_schedule,
)


def _ill_conditioned(m, n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k)
    return U[:, :k] @ torch.diag(s) @ V[:, :k].T


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (128, 48)])
def test_newton_schulz_near_orthogonal_random(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ortho = newton_schulz(G)
    s = torch.linalg.svdvals(ortho)
    # quintic NS5 (Jordan's coefficients) leaves singular values in roughly [0.7, 1.2]
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())  # observed ~[0.57, 1.2]
    assert _cos(ortho, polar_reference(G)) > 0.97


def test_newton_schulz_ill_conditioned():
    G = _ill_conditioned(64, 48, cond=1e3)
    ortho = newton_schulz(G)
    assert _cos(ortho, polar_reference(G)) > 0.8
    # the large singular directions are mapped into the band; tiny ones (< ~1e-2 relative) are only partly lifted
    s = torch.linalg.svdvals(ortho)
    assert s.max() < 1.5 and (s > 0.5).float().mean() > 0.6


def test_newton_schulz_bf16_close_to_fp32():
    G = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    assert _cos(newton_schulz(G, dtype=torch.bfloat16), newton_schulz(G)) > 0.99


def test_newton_schulz_batched_equals_per_matrix():
    G = torch.randn(5, 48, 32, generator=torch.Generator().manual_seed(3))
    ortho = newton_schulz(G)
    for e in range(G.size(0)):
        torch.testing.assert_close(ortho[e], newton_schulz(G[e]), rtol=1e-5, atol=1e-6)


def test_muon_update_matches_definition():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 16, 24))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    g = torch.randn_like(p)
    p.grad = g.clone()
    opt.step()
    u = g + 0.9 * g  # Nesterov on a fresh buffer: g + mu * (0 * mu + g)
    want = p0 * (1 - 0.1 * 0.5) - 0.1 * muon_scale(p.shape) * newton_schulz(u)
    torch.testing.assert_close(p.detach(), want)
    rms = (newton_schulz(u) * muon_scale(p.shape)).pow(2).mean().sqrt()
    assert 0.1 < rms < 0.3  # Moonlight scaling: update RMS ~0.2


def test_muon_groups_same_shaped_matrices_exactly():
    """Matrices of one shape are orthogonalised together; each moves as it would alone (and other shapes too)."""
    torch.manual_seed(1)
    shapes = [(16, 24), (16, 24), (8, 16), (16, 24), (2, 8, 16)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    alone = [nn.Parameter(p.detach().clone()) for p in ps]
    together = Muon(ps, lr=0.05, weight_decay=0.1)
    singles = [Muon([p], lr=0.05, weight_decay=0.1) for p in alone]
    for _ in range(3):
        for p, q, g in zip(ps, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        together.step()
        for opt in singles:
            opt.step()
    for p, q in zip(ps, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_muon_reduces_least_squares_loss():
    g = torch.Generator().manual_seed(4)
    X, W_true = torch.randn(256, 32, generator=g), 0.3 * torch.randn(16, 32, generator=g)
    Y = X @ W_true.T
    W = nn.Parameter(torch.zeros(16, 32))
    opt = Muon([W], lr=0.1)
    losses = []
    for _ in range(60):
        loss = (X @ W.T - Y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_param_groups_cover_model_once():
    model = Transformer(ModelArgs.from_name("tiny"))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    ids = [id(p) for gs in groups.values() for gr in gs for p in gr["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    kind = {id(p): gr["kind"] for gs in groups.values() for gr in gs for p in gr["params"]}
    names = dict(model.named_parameters())
    expect = {
        "layers.0.attn.wq_a.weight": "muon", "layers.0.attn.wo_b.weight": "muon",
        "layers.0.ffn.experts.w13": "muon", "layers.0.ffn.experts.w2": "muon",
        "layers.0.ffn.shared_experts.w2.weight": "muon", "layers.1.attn.indexer.weights_proj.weight": "muon",
        "layers.1.attn.compressor.wgate.weight": "muon", "mtp.0.e_proj.weight": "muon",
        "embed.weight": "no_decay", "head.weight": "decay", "layers.0.ffn.gate.weight": "decay",
        "norm.weight": "no_decay", "layers.0.attn.q_norm.weight": "no_decay", "layers.0.attn.attn_sink": "no_decay",
        "layers.0.hc_attn.fn": "no_decay", "layers.0.hc_attn.base": "no_decay", "hc_head.scale": "no_decay",
        "layers.1.attn.compressor.ape": "no_decay",
    }
    for n, k in expect.items():
        assert kind[id(names[n])] == k, n
    for n, p in names.items():  # muon gets only matrices; buffers are never parameters
        assert kind[id(p)] != "muon" or p.dim() >= 2, n
    assert "bias" not in " ".join(names)  # gate.bias is a buffer
    wd = {gr["kind"]: gr["weight_decay"] for gs in groups.values() for gr in gs}
    assert wd["no_decay"] == 0.0 and wd["decay"] == wd["muon"] == 0.1
    assert param_kind("x.bias", nn.Parameter(torch.zeros(3))) == "no_decay"


def test_adamw_group_equals_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": [ref[2].weight], "weight_decay": 0.1},
                                 {"params": [ref[0].weight, *ref[1].parameters(), ref[2].bias], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                # the kernel ours picks: bits differ across kernels
                                fused=has_fused_adamw("cpu") or None)
    x = torch.randint(0, 10, (4, 5))
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_row_adam_equals_sparse_adam_bit_for_bit():
    """Five steps on two tables: rows read several times per step (uncoalesced gradients), a step that reads no row
    of one table, an lr changed midway; values and both moments equal torch.optim.SparseAdam's exactly, and each
    optimizer's state dict loads into the other."""
    torch.manual_seed(0)
    ref = [nn.Embedding(50, 6, sparse=True), nn.Embedding(30, 4, sparse=True)]
    ours = copy.deepcopy(ref)
    opts = [torch.optim.SparseAdam([t.weight for t in ref], lr=3e-2, betas=(0.9, 0.95), eps=1e-8),
            RowAdam([t.weight for t in ours], lr=3e-2, betas=(0.9, 0.95), eps=1e-8)]
    for step in range(5):
        rows = [torch.randint(0, 50, (7, 3)), torch.randint(0, 30, (5,))]
        for tables, opt in zip((ref, ours), opts):
            if step == 3:
                opt.param_groups[0]["lr"] = 1e-2
            opt.zero_grad()
            loss = tables[0](rows[0]).pow(2).sum()
            if step != 2:
                loss = loss + (tables[1](rows[1]) * torch.arange(4.0)).sum()
            loss.backward()
            opt.step()
        for a, b in zip(ref, ours):
            assert torch.equal(a.weight, b.weight)
            sa, sb = opts[0].state[a.weight], opts[1].state[b.weight]
            assert sa["step"] == sb["step"]
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [opts[1].state[t.weight]["step"] for t in ours] == [5, 4]  # a step without a table's rows skips it
    opts[1].load_state_dict(opts[0].state_dict())
    opts[0].load_state_dict(opts[1].state_dict())
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        w = nn.Parameter(torch.zeros(3, 2))
        w.grad = torch.ones(3, 2)
        RowAdam([w]).step()


def test_state_dict_round_trip_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 24), nn.LayerNorm(24), nn.Linear(24, 32))
    opt = build_optimizer(model, "muon", lr=1e-2, weight_decay=0.1)
    assert opt.muon is not None and len(opt.muon.param_groups[0]["params"]) == 2
    x = torch.randint(0, 32, (4, 7))

    def step(m, o):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for _ in range(2):
        step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, "muon", lr=1e-2, weight_decay=0.1)
    sd = copy.deepcopy(opt.state_dict())
    twin_opt.load_state_dict(sd)
    for _ in range(2):
        step(model, opt)
        step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_muon_step_on_a_model_is_orthogonalised():
    """One Muon step on the tiny model's expert stack [E, 2I, D] moves each expert matrix by -lr * scale * O with O
    ~ the polar factor of its (Nesterov) gradient: singular values near 1 (Newton-Schulz's band), the direction of
    U V^T. A plain gradient step (no orthogonalisation) has the gradient's own, spread-out singular values."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights()
    lr = 1e-3
    opt = build_optimizer(model, "muon", lr=lr, weight_decay=0.0)
    w = model.layers[1].ffn.experts.w13
    before = w.detach().clone()
    out = model(torch.randint(0, 512, (2, 64)))
    out.float().pow(2).mean().backward()
    grad = w.grad.detach().clone()
    opt.step()
    update = (before - w.detach()) / (lr * muon_scale(w.shape))  # [E, 2I, D]
    used = grad.flatten(1).norm(dim=1) > 0  # experts that received tokens
    assert used.sum() >= 2
    # an expert's gradient has rank <= its tokens: Newton-Schulz lifts every direction the gradient has (singular
    # values above ~1% of its norm) to ~1 and leaves the null space at 0
    g_sv = torch.linalg.svdvals(grad[used].double())
    g_sv = g_sv / g_sv.square().sum(-1, keepdim=True).sqrt()
    u_sv = torch.linalg.svdvals(update[used].double())
    for g, u in zip(g_sv, u_sv):
        k = int((g > 0.02).sum())
        assert k >= 2 and u[:k].min() > 0.5 and u[:k].max() < 1.3, (k, u[:k])
        assert g[0] / g[k - 1] > 3  # while the raw gradient's spread far apart: a plain step would keep that
    # the direction: U_k V_k^T over those k directions (momentum starts at 0: the Nesterov update is (1 + mu) g)
    for g, u in zip(grad[used].double(), update[used].double()):
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        k = int((S / S.norm() > 0.02).sum())
        polar_k = U[:, :k] @ Vh[:k]
        assert torch.nn.functional.cosine_similarity(u.flatten(), polar_k.flatten(), dim=0) > 0.9


def test_schedules_endpoints_and_monotone():
    warm, total = 10, 100
    c = [cosine_schedule(s, warm, total, min_lr_ratio=0.1) for s in range(total + 1)]
    assert c[0] <= 0.1 and c[warm - 1] == pytest.approx(1.0) and c[warm] == pytest.approx(1.0)
    assert c[total] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(c[:warm], c[1:warm]))
    assert all(a >= b for a, b in zip(c[warm:], c[warm + 1:]))
    w = [wsd_schedule(s, warm, total, decay_frac=0.2, min_lr_ratio=0.0) for s in range(total + 1)]
    assert w[0] <= 0.1 and w[warm] == 1.0 and w[79] == 1.0 and w[total] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(w[80:], w[81:])) and w[90] == pytest.approx(0.5)


def test_set_lr_scales_base_lr():
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))
    opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=2e-2)
    mult = set_lr(opt, 0, warmup=4, total=10)
    assert mult == pytest.approx(0.25)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[0] == pytest.approx(0.25e-3) and lrs[-1] == pytest.approx(0.25 * 2e-2)


def test_clip_grad_norm_with_none_grads():
    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0, 0]), torch.tensor([0, 4.0, 0])
    assert clip_grad_norm([a, b, c], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0, 0, 0, 0.8, 0]), atol=1e-5, rtol=0)
    assert clip_grad_norm([a, b, c], 10.0) == pytest.approx(1.0, abs=1e-4)  # under the limit: untouched
    assert clip_grad_norm([c], 1.0) == 0.0
