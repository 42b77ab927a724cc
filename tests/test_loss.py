"""The training objective: each term is wired to the right targets and the whole thing can be minimised."""

import torch

from dsv4.loss import cross_entropy, training_loss
from tests.helpers import random_ids, random_model


def test_cross_entropy_mask_counts_only_selected_tokens():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.zeros(2, 5)
    mask[1, 2:] = 1
    want = torch.nn.functional.cross_entropy(logits[1, 2:], targets[1, 2:])
    torch.testing.assert_close(cross_entropy(logits, targets, mask), want)


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
    for m in model.modules():
        if hasattr(m, "aux_alpha"):
            m.aux_alpha = 1e-3
    ids = random_ids(model.args, 2, 48)
    targets = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, metrics = training_loss(model, ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["ce"])
    assert "balance_loss" in metrics and "mtp_ce" in metrics
    assert losses[-1] < 0.5 * losses[0], losses


def test_indexer_kl_joins_the_loss_in_training_stages():
    model = random_model().train()
    for layer in model.layers:
        layer.attn.indexer_train = "sparse"
    ids = random_ids(model.args, 1, 80)
    loss, metrics = training_loss(model, ids, torch.roll(ids, -1, dims=1), mtp_weight=0.0, indexer_weight=0.5)
    assert metrics["indexer_kl"] > 0
    assert abs(loss.item() - metrics["ce"] - 0.5 * metrics["indexer_kl"]) < 1e-4
