"""The training objective: each term is wired to the right targets and the whole thing can be minimised."""

import pytest
import torch

from dsv4.kernels.cross_entropy import linear_cross_entropy
from dsv4.model.stats import TrainStats
from dsv4.train.loss import cross_entropy, training_loss
from tests.helpers import random_ids, random_model


def test_cross_entropy_mask_counts_only_selected_tokens():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.zeros(2, 5)
    mask[1, 2:] = 1
    want = torch.nn.functional.cross_entropy(logits[1, 2:], targets[1, 2:])
    torch.testing.assert_close(cross_entropy(logits, targets, mask), want)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_linear_cross_entropy_matches_head_then_cross_entropy(masked, chunk):
    """The fused head + loss gives the unfused loss and the same gradients for the hidden states and the head,
    for chunk sizes that split rows unevenly, one chunk, and with a mask."""
    g = torch.Generator().manual_seed(chunk or 0)
    x = torch.randn(3, 17, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(50, 24, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 50, (3, 17), generator=g)
    mask = (torch.rand(3, 17, generator=g) < 0.6).double() if masked else None
    per_token = torch.nn.functional.cross_entropy((x @ w.t()).flatten(0, 1), t.flatten(), reduction="none")  # fp64
    want = per_token.mean() if mask is None else (per_token * mask.flatten()).sum() / mask.sum()
    want_gx, want_gw = torch.autograd.grad(want * 2.5, (x, w))
    got = linear_cross_entropy(x, w, t, mask, chunk=chunk)
    gx, gw = torch.autograd.grad(got * 2.5, (x, w))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, want_gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, want_gw, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_without_gradients_or_with_some():
    """Under no_grad (evaluation) the value is the same; with only the hidden states trainable (a frozen head) their
    gradient is the same, and gradients flow through a sum of two calls (main + MTP) as through the unfused ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = 0.3 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    t = torch.randint(0, 40, (2, 9), generator=g)

    def unfused(h, tt):
        return torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), tt.flatten())

    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), unfused(x, t), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(unfused(x, t) + 0.3 * unfused(x[:, :-1], t[:, 1:]), x)[0]
    got = torch.autograd.grad(linear_cross_entropy(x, w, t) + 0.3 * linear_cross_entropy(x[:, :-1], w, t[:, 1:]), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_cross_entropy_in_bf16_is_as_accurate_as_the_unfused_head(compiled):
    """In bf16 both paths round (bf16 logits and gradients, fp32 soft-max); against the exact fp64 values the fused
    one is no less accurate than head-then-cross-entropy, eager or with its chunks torch.compiled."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=g).bfloat16().requires_grad_()
    w = (0.2 * torch.randn(1000, 64, generator=g)).bfloat16().requires_grad_()
    t = torch.randint(0, 1000, (300,), generator=g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(x64 @ w64.t(), t)
    exact_grads = torch.autograd.grad(exact, (x64, w64))
    unfused = cross_entropy((x @ w.t())[None], t[None])
    fused = linear_cross_entropy(x, w, t, chunk=128, compiled=compiled)

    def error(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    assert error(fused, exact) <= 1.5 * error(unfused, exact) + 1e-6
    for got, ref, want in zip(torch.autograd.grad(fused, (x, w)), torch.autograd.grad(unfused, (x, w)), exact_grads):
        assert got.dtype == torch.bfloat16
        assert error(got, want) <= 1.5 * error(ref, want) + 1e-4, (error(got, want), error(ref, want))


def test_mtp_targets_are_two_ahead():
    """MTP row i is scored against token i+2 (targets shifted by one more), and the terms add up."""
    model = random_model()
    ids = random_ids(model.args, 2, 33)
    targets = torch.roll(ids, -1, dims=1)
    _, (mtp,) = model(ids, mtp=True)
    loss, metrics = training_loss(model, ids, targets, mtp_weight=1.0)
    want = torch.nn.functional.cross_entropy(mtp.flatten(0, 1).float(), targets[:, 1:].flatten())
    assert abs(metrics["mtp_ce"] - want.item()) < 1e-5
    assert abs(loss.item() - metrics["ce"] - metrics["mtp_ce"]) < 1e-5


def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    model = random_model().train()
    ids = random_ids(model.args, 2, 48)
    targets = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, metrics = training_loss(model, ids, targets, aux_alpha=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["ce"])
    assert "balance_loss" in metrics and "mtp_ce" in metrics
    assert losses[-1] < 0.5 * losses[0], losses


def test_indexer_kl_joins_the_loss_in_training_stages():
    model = random_model().train()
    ids = random_ids(model.args, 1, 80)
    loss, metrics = training_loss(model, ids, torch.roll(ids, -1, dims=1), mtp_weight=0.0, indexer_weight=0.5,
                                  stats=TrainStats(indexer="sparse"))
    assert metrics["indexer_kl"] > 0
    assert abs(loss.item() - metrics["ce"] - 0.5 * metrics["indexer_kl"]) < 1e-4
