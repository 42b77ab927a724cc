"""Training snapshots: exact round trip of model, optimizer and RNG; atomic writes; corrupt ones are skipped."""

import os
import random

import numpy as np
import pytest
import torch

from dsv4.train.snapshot import list_snapshots, load_latest, save_snapshot, set_rng_state
from tests.helpers import random_ids, random_model


def train_steps(model, opt, ids, n):
    for _ in range(n):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_from_snapshot_is_bit_exact(tmp_path):
    model = random_model(seed=1, tie_embeddings=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = random_ids(model.args, 2, 24)
    train_steps(model, opt, ids, 2)
    save_snapshot(tmp_path, 2, model, opt.state_dict(), meta={"data_position": 17})
    train_steps(model, opt, ids, 1)

    fresh = random_model(seed=5, tie_embeddings=True).train()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    snap = load_latest(tmp_path)
    assert snap["step"] == 2 and snap["meta"] == {"data_position": 17}
    fresh.load_state_dict(snap["model"])
    fresh_opt.load_state_dict(snap["optimizer"])
    train_steps(fresh, fresh_opt, ids, 1)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.head.weight is fresh.embed.weight


def test_rng_state_round_trip(tmp_path):
    model = random_model()
    save_snapshot(tmp_path, 1, model, {})
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_latest(tmp_path)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_corrupt_newest_snapshot_falls_back_to_previous(tmp_path):
    model = random_model()
    save_snapshot(tmp_path, 1, model, {"lr": 0.1})
    newest = save_snapshot(tmp_path, 2, model, {"lr": 0.2})
    path = os.path.join(newest, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(UserWarning, match="model.safetensors is missing or does not match its checksum"):
        snap = load_latest(tmp_path)
    assert snap["step"] == 1 and snap["optimizer"] == {"lr": 0.1}


def test_failed_save_leaves_nothing_and_keep_prunes(tmp_path):
    model = random_model()
    with pytest.raises(TypeError, match="cannot store object"):
        save_snapshot(tmp_path, 1, model, {"bad": object()})
    assert os.listdir(tmp_path) == []
    for step in range(1, 5):
        save_snapshot(tmp_path, step, model, {}, keep=2)
    assert [os.path.basename(p) for p in list_snapshots(tmp_path)] == ["step-000000003", "step-000000004"]
