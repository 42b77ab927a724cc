"""dsv4.weights.info: parameter counts match DeepSeek's published sizes, every parameter lands in exactly one component,
and the FLOPs and cache formulas give the hand-computed numbers on `tiny`."""

import pytest
import torch
from safetensors.torch import save_file

from dsv4.config import ModelArgs
from dsv4.weights.info import checkpoint_tensors, meta_model, model_info

# a tiny configuration pinned here (presets may change) so the hand-computed numbers below stay true
HAND = dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, head_dim=32, rope_head_dim=16, q_lora_rank=32, o_groups=2,
            o_lora_rank=32, window_size=16, compress_ratios=[0, 4, 16, 4, 0], csa_ratio=4, hca_ratio=16,
            index_n_heads=8, index_head_dim=32, index_topk=8, n_routed_experts=8, n_activated_experts=2,
            n_shared_experts=1, moe_inter_dim=64, n_hash_layers=1, hc_mult=4, n_mtp_layers=1, tie_embeddings=False)


def hand_args(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **{**HAND, **overrides})


# (total, active) as published; DeepSeek counts the main model without MTP and the embedding as not active
PUBLISHED = {"v4-flash": (284e9, 13e9), "v4-pro": (1.6e12, 49e9), "v4-1t": (1e12, None)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes_within_3_percent(name):
    total, active = PUBLISHED[name]
    main = model_info(ModelArgs.from_name(name))["totals"]["main"]
    assert main["total"] == pytest.approx(total, rel=0.03)
    if active:
        assert main["active"] == pytest.approx(active, rel=0.03)


def test_published_flash_size_excludes_mtp():
    t = model_info(ModelArgs.from_name("v4-flash"))["totals"]
    assert t["with_mtp"]["total"] == t["main"]["total"] + t["mtp"]["total"]
    assert abs(t["main"]["total"] - 284e9) < 0.002 * 284e9  # 284.33B
    assert abs(t["with_mtp"]["total"] - 284e9) > 0.02 * 284e9  # 290.94B: the published figure is not this


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash"])
def test_every_parameter_counted_once(name):
    args = ModelArgs.from_name(name)
    info = model_info(args)
    model = meta_model(args)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    for part, expected in (("main", main), ("mtp", mtp)):
        assert sum(c["total"] for c in info["params"][part].values()) == expected == info["totals"][part]["total"]
    assert info["totals"]["with_mtp"]["total"] == main + mtp


def test_active_counts():
    p = model_info(hand_args())["params"]["main"]  # 2 of 8 experts, vocab 512, dim 64
    assert p["routed_experts"]["active"] * 4 == p["routed_experts"]["total"]
    assert p["embedding"] == {"total": 512 * 64, "active": 0}
    assert p["head"] == {"total": 512 * 64, "active": 512 * 64}
    for c in ("attention", "shared_experts", "router", "hyper_connections", "norms"):
        assert p[c]["active"] == p[c]["total"] > 0


def test_tied_head_is_stored_once_but_still_computes():
    untied = model_info(hand_args())
    tied = model_info(hand_args(tie_embeddings=True))
    assert tied["totals"]["main"]["total"] == untied["totals"]["main"]["total"] - 512 * 64
    assert tied["totals"]["main"]["active"] == untied["totals"]["main"]["active"]
    assert tied["flops_per_token"] == untied["flops_per_token"]


def test_flops_and_cache_by_hand():
    # layers [swa, csa(m=4), hca(m=16), csa] + an SWA MTP layer; window 16, 4 heads x 32, indexer 8 x 32, top-8
    info = model_info(hand_args(), contexts=[64], cache_dtype=torch.bfloat16)
    f = info["flops_per_token"]["64"]
    # keys: swa 16, csa 16 + min(8, 64 // 4), hca 16 + 64 // 16, csa 24
    assert f["attention"] == 4 * 4 * 32 * (16 + 24 + 20 + 24)
    assert f["indexer"] == 2 * (2 * 8 * 32 * 16)
    # matmul weights a token multiplies by, per layer: attention wq_a, wq_b, wkv, wo_a, wo_b; router; 2 of 8 experts
    # (w13 + w2); shared expert; two mHC fn matrices. CSA adds compressor wkv+wgate and the indexer's wq_b,
    # weights_proj and compressor; HCA its compressor. Then head and hc_head.fn.
    layer = (2048 + 4096 + 2048 + 4096 + 4096) + 512 + 2 * (128 * 64 + 64 * 64) + 3 * 64 * 64 + 2 * 24 * 256
    csa = 2 * 64 * 64 + (32 * 256 + 64 * 8 + 2 * 64 * 64)
    hca = 2 * 64 * 32
    assert f["matmul"] == 2 * (4 * layer + 2 * csa + hca + 512 * 64 + 4 * 256)
    assert f["total"] == f["matmul"] + f["attention"] + f["indexer"]
    c = info["cache_bytes"]["64"]
    assert c["window"] == 2 * 4 * 16 * 32
    assert c["compressed"] == 2 * (16 * 32 + 4 * 32 + 16 * 32)
    assert c["indexer"] == 2 * 2 * 16 * 32
    assert c["partial"] == 2 * (2 * 16 * 32 + 2 * (6 * 4 * 32 + 6 * 4 * 32))
    assert c["total"] == c["window"] + c["compressed"] + c["indexer"] + c["partial"]
    assert c["per_token"] == c["total"] / 64
    assert c["mtp"] == 2 * 16 * 32
    fp32 = model_info(hand_args(), contexts=[64], cache_dtype=torch.float32)["cache_bytes"]["64"]
    assert fp32["total"] == 2 * c["total"]


def test_long_context_cache_is_dominated_by_compressed_entries():
    c = model_info(ModelArgs.from_name("v4-flash"))["cache_bytes"]
    # 21 CSA layers (512 + 128 per 4 tokens) + 20 HCA layers (512 per 128 tokens), bf16: 6.7 KiB per token at 1M
    per_token = 2 * (21 * (512 + 128) / 4 + 20 * 512 / 128)
    assert c["1048576"]["per_token"] == pytest.approx(per_token, rel=0.01)
    assert c["131072"]["per_token"] == pytest.approx(per_token, rel=0.02)


def test_checkpoint_tensors(tmp_path):
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5)}, tmp_path / "model-1.safetensors")
    save_file({"c": torch.zeros(2, dtype=torch.int8)}, tmp_path / "model-2.safetensors")
    (tmp_path / "notes.txt").write_text("not a tensor file")
    t = checkpoint_tensors(tmp_path)
    assert (t["files"], t["tensors"], t["elements"], t["bytes"]) == (2, 3, 19, 24 + 20 + 2)
    assert t["dtypes"] == {"BF16": 24, "F32": 20, "I8": 2}


def test_engine_cache_bytes_are_the_real_allocation():
    from dsv4.model.cache import KVCache
    from dsv4.weights.info import engine_cache_bytes

    args = ModelArgs.from_name("tiny")
    real = KVCache(args, slots=2, max_len=1000, dtype=torch.bfloat16)
    assert engine_cache_bytes(args, 1000, torch.bfloat16) * 3 == real.nbytes()
    info = model_info(args, contexts=[1000, 2000])
    assert info["cache_bytes"]["2000"]["engine"] - info["cache_bytes"]["1000"]["engine"] == pytest.approx(
        1000 * info["engine_cache_bytes_per_token"], rel=0.01)
