"""`dsv4 plan --train` (dsv4.train.scaling): the activations it counts on `meta` against the tensors a real CPU forward
saves, its memory and traffic terms against hand calculations from independent counts, and its recommendations."""

import json

import pytest
import torch

from dsv4.cli import main
from dsv4.config import ModelArgs
from dsv4.model.stats import TrainStats
from dsv4.train.pipeline import build_model
from dsv4.train.scaling import GB, Params, block_activations, layout, recommend
from dsv4.weights.info import Count, count_params, meta_model


def cpu_saved_bytes(args: ModelArgs, seq: int) -> list[float]:
    """Bytes per token each main block saves for its backward in a real bf16 CPU forward (storages counted once)."""
    model = build_model(args, torch.device("cpu"), 0).to_dtype(torch.bfloat16)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    ids = torch.randint(0, args.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq)
    ropes = {k: model.rope(k, positions) for k in ("swa", "csa")}
    ropes["hca"] = ropes["csa"]
    h = model.embed(ids).float().unsqueeze(2).expand(-1, -1, args.hc_mult, -1).contiguous().requires_grad_()
    memory = model.engram_rows(ids)
    sizes = []
    for layer in model.layers:
        saved = {}

        def pack(t, saved=saved):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = layer(h, ids, ropes[layer.kind], stats=TrainStats(indexer="sparse").layer(layer.layer_id),
                      memory=memory.get(layer.layer_id))
        sizes.append(sum(saved.values()) / seq)
    return sizes


@pytest.mark.parametrize("preset, seq", [("tiny", 256), ("v4-2m-engram", 256)])
def test_activations_counted_on_meta_are_what_a_cpu_forward_saves(preset, seq, monkeypatch):
    args = ModelArgs.from_name(preset)
    counted = block_activations(args, seq)
    # (the CPU's bf16 grouped GEMM rounds each expert's rows up to 64 for oneDNN's kernel cache; accelerators do not)
    monkeypatch.setattr("dsv4.model.moe.grouped_rows_multiple", lambda device, dtype: 1)
    measured = cpu_saved_bytes(args, seq)
    for layer, (c, m) in enumerate(zip(counted, measured)):  # every kind of block: SWA, CSA, HCA, hashed, Engram
        assert abs(c - m) <= 0.1 * m, (layer, c, m)


def test_parameter_split_matches_an_independent_count():
    args = ModelArgs.from_name("tiny")
    p = Params.of(args)
    counts = count_params(meta_model(args))
    total = sum((c for part in ("main", "mtp") for c in counts[part].values()), Count())
    assert p.total == total.total and p.adamw + p.muon == p.total
    per_expert = 3 * args.moe_inter_dim * args.dim  # w1, w3 [I, D] and w2 [D, I]
    blocks = args.n_layers + args.n_mtp_layers
    assert p.experts == blocks * args.n_routed_experts * per_expert
    assert p.unit_experts == args.n_routed_experts * per_expert
    model = meta_model(args)
    in_blocks = sum(p.numel() for b in [*model.layers, *model.mtp] for p in b.parameters())
    assert p.root == p.total - in_blocks and p.root >= args.vocab_size * args.dim  # the embedding at least

def test_v4_flash_terms_against_a_hand_calculation():
    args = ModelArgs.from_name("v4-flash")
    p = Params.of(args)
    counts = count_params(meta_model(args))
    total = sum(c.total for part in ("main", "mtp") for c in counts[part].values())
    experts = counts["main"]["routed_experts"].total + counts["mtp"]["routed_experts"].total
    assert (p.total, p.experts) == (total, experts)
    a_block = [1000.0] * (args.n_layers + args.n_mtp_layers)  # a stand-in: the activation terms checked above
    lay = layout(args, p, a_block, gpus=512, ep=256, checkpointing=True, seq_len=4096)
    assert lay.memory["masters"] == pytest.approx(4 * total / 512)  # 2.27 GB
    assert lay.memory["optimizer"] == pytest.approx((8 * p.adamw + 4 * p.muon) / 512)
    layers = args.n_layers + args.n_mtp_layers
    stream = args.hc_mult * args.dim * 4
    assert lay.memory["activations"] == pytest.approx(4096 * (stream * layers + 1000))
    # all-to-all: dispatch + combine, 3 passes (forward, backward, recompute), 6 experts per token, bf16, 255/256 away
    assert lay.comm["all_to_all"] == pytest.approx(2 * 3 * 4096 * 6 * 4096 * 2 * 255 / 256 * layers)
    dense = total - experts
    assert lay.comm["fsdp_dense"] == pytest.approx((2 * 3 + 4) * dense * 511 / 512)
    assert lay.comm["fsdp_experts"] == pytest.approx((2 * 3 + 4) * experts / 256 * 1 / 2)
    alone = layout(args, p, a_block, gpus=8, ep=1, checkpointing=False)
    assert alone.comm["all_to_all"] == 0 and alone.memory["activations"] == pytest.approx(4096 * 1000 * layers)


def test_recommendations_fit_and_the_smallest_count_that_fits_is_found():
    args = ModelArgs.from_name("v4-flash")
    p = Params.of(args)
    big = recommend(args, 512, params=p)
    assert big["fits"] and big["layout"]["total_memory"] <= 72 * GB
    assert args.n_routed_experts % big["layout"]["expert_parallel"] == 0
    small = recommend(args, 8, params=p)
    assert not small["fits"] and small["layout"]["total_memory"] > 72 * GB
    need = small["gpus_needed"]
    assert recommend(args, need, params=p)["fits"] and not recommend(args, need - 8, params=p)["fits"]


def test_plan_train_command(capsys):
    assert main(["plan", "--train", "--model", "tiny", "--gpus", "1,2", "--gpu-memory", "1GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [e["gpus"] for e in plan["plans"]] == [1, 2] and all(e["fits"] for e in plan["plans"])
    assert main(["plan", "--train", "--model", "v4-flash"]) == 0
    text = capsys.readouterr().out
    assert "8 GPUs:" in text and "DOES NOT FIT" in text and "512 GPUs: expert parallel" in text
    assert main(["plan", "--train", "--model", "tiny", "--gpus", "two"]) == 2
    assert "--gpus takes GPU counts" in capsys.readouterr().err
