"""dsv4.train.modality: tokens are labelled by what they are, the expert load per modality counts exactly the routes
the model takes (cross-checked against the load the training forward reports), and the plot is written."""

import pytest
import torch

from dsv4.data.multimodal import MultimodalMix, VisualItem
from dsv4.model.stats import RouteTrace, TrainStats
from dsv4.train.modality import MODALITIES, expert_load_by_modality, rows_by_task, task_losses, token_modalities
from dsv4.train.plots import plot_expert_load
from tests.helpers import random_model, small_visual_vocab


@pytest.fixture(scope="module")
def setup():
    tok, vocab = small_visual_vocab()
    g = torch.Generator().manual_seed(0)
    images = [VisualItem(f"the digit {i}", torch.randint(0, 1000, (1, 16), generator=g)) for i in range(4)]
    clips = [VisualItem(f"the digit {i} moving up", torch.randint(0, 1000, (3, 16), generator=g), "moving up")
             for i in range(4)]
    text = torch.randint(100, tok.vocab_size, (3000,), generator=g)
    mix = MultimodalMix(tok, vocab, text, images, clips, seq_len=96)
    return tok, vocab, mix, random_model(0, vocab_size=vocab.size)


def test_tokens_are_labelled_by_what_they_are(setup):
    tok, vocab, mix, _ = setup
    rows = rows_by_task(mix, seed=9, rows_per_task=2)
    assert set(rows) == {"text", "text->image", "text->video", "image->video", "image->caption"}
    for task, (ids, _) in rows.items():
        labels = token_modalities(task, ids, vocab, tok.pad_id)
        assert bool((labels[ids == tok.pad_id] == -1).all())
        named = {MODALITIES[i] for i in labels.unique().tolist() if i >= 0}
        span = "image" if task in ("text->image", "image->caption") else "video"
        assert named == ({"text"} if task == "text" else {"caption", span}), task
        codes = vocab.is_code(ids)
        if task != "text":
            assert bool((labels[codes] == MODALITIES.index(span)).all())


def test_expert_load_per_modality_counts_every_route(setup):
    tok, vocab, mix, model = setup
    rows = rows_by_task(mix, seed=3, rows_per_task=3)
    load = expert_load_by_modality(model, rows, vocab, tok.pad_id, torch.device("cpu"))
    K = model.args.n_activated_experts
    for layer, shares in load["share"].items():
        for m, s in shares.items():
            assert abs(sum(s) - 1) < 1e-3 and min(s) >= 0, (layer, m)
    # the shares times each modality's assignments add up to the load the training forward reports, non-pad tokens
    total = {layer: sum(torch.tensor(s) * load["tokens"][m] * K for m, s in shares.items())
             for layer, shares in load["share"].items()}
    want = {}
    for ids, _ in rows.values():
        x = ids[:, :-1]
        keep = x != tok.pad_id
        with RouteTrace(model) as trace:
            stats = TrainStats()
            model(x, stats=stats)
        ran = [name for name, v in trace.routes.items() if v]  # the main blocks' MoE layers (not MTP's)
        assert len(ran) == model.args.n_layers
        for i, name in enumerate(ran):
            full = stats.layers[i].load  # every token's assignments (pads included)
            assert torch.equal(torch.bincount(trace.experts(name).flatten(), minlength=full.numel()).float(), full)
            mine = torch.bincount(trace.experts(name)[keep.flatten()].flatten(), minlength=full.numel()).float()
            want[name] = want.get(name, 0) + mine
    for name in total:
        assert torch.allclose(total[name].float(), want[name], atol=0.05 * K), name
    assert set(load["tv_from_text"][next(iter(load["tv_from_text"]))]) == {"caption", "image", "video"}
    assert all(0 <= v <= 1 for d in load["tv_from_text"].values() for v in d.values())
    losses = task_losses(model, rows, torch.device("cpu"))
    assert set(losses) == set(rows) and all(0 < v < 30 for v in losses.values())


def test_the_expert_load_plot_is_written(setup, tmp_path):
    tok, vocab, mix, model = setup
    load = expert_load_by_modality(model, rows_by_task(mix, seed=4, rows_per_task=1), vocab, tok.pad_id,
                                   torch.device("cpu"))
    path = plot_expert_load(load, tmp_path / "expert_load.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 500 and im.size[1] > 150
