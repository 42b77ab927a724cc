"""dsv4.model.moe: what a training forward reports (expert load, sequence-wise balance) against loop references, the
report leaves the output alone, the decode path's products agree with the plain ones, and the aux-loss-free bias
update moves each bias by exactly gamma toward balance."""

import torch

from dsv4.kernels.fused import Fused, Products
from dsv4.model.moe import Experts, MoE, expert_load, sequence_balance
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
