"""dsv4.model.moe: what a training forward reports (expert load, sequence-wise balance) against loop references, the
report leaves the output alone, the decode path's products agree with the plain ones, and the aux-loss-free bias
update moves each bias by exactly gamma toward balance."""

import torch

from dsv4.device import grouped_rows_multiple
from dsv4.kernels.fused import Fused, Products
from dsv4.model.moe import Experts, MoE, expert_load, padded_groups, sequence_balance
from dsv4.model.stats import LayerStats
from dsv4.train.trainer import update_balance_bias
from tests.helpers import tiny_args


def moe_layer(seed: int = 0, hashed: bool = False) -> MoE:
    args = tiny_args(n_routed_experts=8, n_activated_experts=2, n_hash_layers=1 if hashed else 0)
    torch.manual_seed(seed)
    moe = MoE(args, layer_id=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if hashed:
        moe.gate.reset_parameters(0.3, seed=seed)
    else:
        moe.gate.bias.normal_(0, 0.1)
    return moe


def test_moe_reports_load_and_balance_as_the_loop_references_compute_them():
    moe = moe_layer()
    B, T = 3, 11
    x = torch.randn(B, T, moe.gate.weight.shape[1])
    stats = LayerStats(balance=True)
    with torch.no_grad():
        y = moe(x, stats=stats)
        torch.testing.assert_close(y, moe(x))  # reporting changes nothing
        _, idx, scores = moe.gate(x.view(-1, x.shape[-1]), None)
    E, K = scores.shape[-1], idx.shape[-1]
    assert torch.equal(stats.load, torch.bincount(idx.flatten(), minlength=E).float())
    want = 0.0
    for b in range(B):  # DeepSeek-V3 eq. 17-20, one sequence at a time
        rows = slice(b * T, (b + 1) * T)
        f = [E / (K * T) * int((idx[rows] == i).any(-1).sum()) for i in range(E)]
        p = (scores[rows] / scores[rows].sum(-1, keepdim=True)).mean(0)
        want += sum(f[i] * p[i].item() for i in range(E)) / B
    assert abs(stats.seq_balance.item() - want) < 1e-5
    assert LayerStats().seq_balance is None and expert_load(idx, E).sum() == B * T * K


def test_balance_statistic_is_only_computed_when_asked_and_carries_a_gradient():
    moe = moe_layer(1)
    x = torch.randn(2, 8, moe.gate.weight.shape[1])
    quiet = LayerStats()
    moe(x, stats=quiet)
    assert quiet.load is not None and quiet.seq_balance is None
    asked = LayerStats(balance=True)
    moe(x, stats=asked)
    asked.seq_balance.backward()
    assert moe.gate.weight.grad.abs().sum() > 0  # it trains the router through the scores


def test_hash_routed_layers_report_load_and_keep_no_bias():
    moe = moe_layer(2, hashed=True)
    ids = torch.randint(0, moe.gate.tid2eid.shape[0], (2, 5))
    stats = LayerStats()
    moe(torch.randn(2, 5, moe.gate.weight.shape[1]), ids, stats=stats)
    assert torch.equal(stats.load, torch.bincount(moe.gate.tid2eid[ids].flatten(), minlength=8).float())
    update_balance_bias(moe.gate, stats.load, gamma=0.5)  # nothing to move
    assert not hasattr(moe.gate, "bias")


def test_bias_update_moves_each_bias_by_gamma_toward_balance():
    moe = moe_layer(3)
    before = moe.gate.bias.clone()
    load = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 8.0, 2.0, 2.0])  # mean 3
    update_balance_bias(moe.gate, load, gamma=0.25)
    torch.testing.assert_close(moe.gate.bias - before, torch.tensor([-1, 1, 0, 0, 1, -1, 1, 1]) * 0.25)


@torch.no_grad()
def test_gathered_experts_agree_across_products_and_with_the_dense_twin():
    """A decode step's few assignments run just the chosen experts: plain (a batched matmul over the gathered
    weights) and fused (matvec over the weights in place) both equal the dense twin."""
    args = tiny_args(n_routed_experts=8, n_activated_experts=3, moe_inter_dim=32, dim=64)
    torch.manual_seed(0)
    ex = Experts(args)
    ex.reset_parameters(0.1)
    x, idx, w = torch.randn(1, 64), torch.tensor([[6, 1, 3]]), torch.rand(1, 3)
    want = ex.forward_dense(x, w, idx)
    for ops in (Products, Fused):
        ex.ops = ops
        torch.testing.assert_close(ex(x, w, idx), want, atol=1e-5, rtol=1e-5)


def test_padded_groups_place_every_assignment_in_its_experts_rounded_group():
    """Over many random routings: every assignment gets its own row, inside its expert's group; every group but the
    last is a multiple of `rows` long and holds its expert's assignments first; the total is static."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        E, A, rows = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (9, 300, 70))
        expert_A = torch.randint(0, E, (A,), generator=g).sort().values
        counts_E = torch.bincount(expert_A, minlength=E)
        pos_A, offs_E, total = padded_groups(expert_A, counts_E, rows)
        assert total == A + E * (rows - 1) and int(offs_E[-1]) == total
        assert len(set(pos_A.tolist())) == A and int(pos_A.min()) >= 0 and int(pos_A.max()) < total
        starts = [0, *offs_E[:-1].tolist()]
        for e in range(E):
            mine = pos_A[expert_A == e].tolist()
            assert mine == list(range(starts[e], starts[e] + len(mine)))  # first in its group, in order
            if e < E - 1:
                assert (offs_E[e] - starts[e]) % rows == 0 and offs_E[e] - starts[e] < counts_E[e] + rows


def test_padded_grouped_experts_equal_the_unpadded_ones_forward_and_backward(monkeypatch):
    """Rounding each expert's rows up (what bf16 on the CPU does so that oneDNN's kernels are reused) changes neither
    the output nor any gradient: the padding rows are zeros and their outputs are never read."""
    import dsv4.model.moe as moe_module

    args = tiny_args(n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32, dim=64)
    torch.manual_seed(0)
    ex = Experts(args)
    ex.reset_parameters(0.1)
    x, w = torch.randn(97, 64, requires_grad=True), torch.rand(97, 2)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(97)])
    idx[:40] = torch.tensor([3, 5])  # a crowded pair of experts and some nearly empty ones
    results = []
    for rows in (1, 5, 64):
        monkeypatch.setattr(moe_module, "grouped_rows_multiple", lambda device, dtype, r=rows: r)
        ex.zero_grad(set_to_none=True)
        x.grad = None
        y = ex(x, w, idx)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((y.detach(), x.grad.clone(), ex.w13.grad.clone(), ex.w2.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][0], ex.forward_dense(x, w, idx).detach(), atol=1e-5, rtol=1e-5)
    assert grouped_rows_multiple(torch.device("cpu"), torch.bfloat16) > 1
    assert grouped_rows_multiple(torch.device("cpu"), torch.float32) == 1
