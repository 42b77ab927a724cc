"""ModelArgs: validation names the offending field, presets survive the transformers config round trip, and
transformers reads our config.json with the same layer schedule and RoPE tables."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.config import PRESETS, ModelArgs
from dsv4.model.rope import rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding  # noqa: E402

# the fields the error cases below are written against, pinned (presets may change)
BASE = dict(n_layers=4, n_mtp_layers=1, compress_ratios=[0, 4, 16, 4, 0], csa_ratio=4, hca_ratio=16, n_heads=4,
            head_dim=32, rope_head_dim=16, index_head_dim=32, n_routed_experts=8, n_activated_experts=2,
            n_hash_layers=1)


def base_args(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **{**BASE, **overrides})


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip(name, tmp_path):
    args = ModelArgs.from_name(name)
    hf = args.to_hf_config()
    assert ModelArgs.from_hf_config(hf) == args
    (tmp_path / "config.json").write_text(json.dumps(hf))  # a checkpoint directory reads the same
    assert ModelArgs.from_hf_config(tmp_path) == args


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_reads_our_config(name):
    args = ModelArgs.from_name(name)
    hf = args.to_hf_config()
    config = transformers.DeepseekV4Config(**hf)
    assert config.layer_types == hf["layer_types"]
    assert config.mlp_layer_types == hf["mlp_layer_types"]
    assert config.rope_parameters == hf["rope_parameters"]
    assert config.qk_rope_head_dim == args.rope_head_dim
    assert config.compress_rates == hf["compress_rates"]
    # the RoPE tables transformers builds from it are ours: plain on SWA layers, YaRN without mscale on compressed
    rotary = DeepseekV4RotaryEmbedding(config)
    torch.testing.assert_close(rotary.main_inv_freq, rope_inv_freq(args, args.rope_theta, yarn=False))
    torch.testing.assert_close(rotary.compress_inv_freq, rope_inv_freq(args, args.compress_rope_theta, yarn=True))
    assert rotary.compress_attention_scaling == 1.0
    # and what transformers writes back reads as the same model
    assert ModelArgs.from_hf_config(config.to_dict()) == args


@settings(max_examples=30)
@given(n_layers=st.integers(1, 6), n_mtp=st.integers(0, 2), data=st.data(),
       rope_factor=st.sampled_from([1.0, 4.0, 16.0]), topk=st.integers(1, 64), n_hash=st.integers(0, 6))
def test_round_trip_any_schedule(n_layers, n_mtp, data, rope_factor, topk, n_hash):
    ratios = data.draw(st.lists(st.sampled_from([0, 4, 16]), min_size=n_layers + n_mtp, max_size=n_layers + n_mtp))
    args = base_args(n_layers=n_layers, n_mtp_layers=n_mtp, compress_ratios=ratios, rope_factor=rope_factor,
                     index_topk=topk, n_hash_layers=min(n_hash, n_layers))
    back = ModelArgs.from_hf_config(args.to_hf_config())
    if rope_factor == 1:  # without YaRN its parameters mean nothing and are not written
        yarn_only = ("original_seq_len", "beta_fast", "beta_slow")
        args = dataclasses.replace(args, **{k: getattr(back, k) for k in yarn_only})
    assert back == args


@pytest.mark.parametrize("override,field", [
    (dict(dim=0), "dim"),
    (dict(n_heads=True), "n_heads"),
    (dict(n_layers=2.5), "n_layers"),
    (dict(o_groups=3), "o_groups"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(n_hash_layers=5), "n_hash_layers"),
    (dict(score_func="relu"), "score_func"),
    (dict(rope_head_dim=15), "rope_head_dim"),
    (dict(index_head_dim=8), "index_head_dim"),  # < rope_head_dim (16): the indexer could not carry the RoPE
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(hca_ratio=4), "csa_ratio"),
    (dict(compress_ratios=[0, 4, 16, 4]), "compress_ratios"),  # one entry short: the MTP layer's is missing
    (dict(compress_ratios=[0, 4, 8, 4, 0]), "compress_ratios"),  # 8 is neither csa_ratio nor hca_ratio
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        base_args(**override)


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="n_experts"):
        ModelArgs.from_dict({**base_args().to_dict(), "n_experts": 8})
    with pytest.raises(ValueError, match="tiny2"):
        ModelArgs.from_name("tiny2")


@pytest.mark.parametrize("change,field", [
    (dict(num_experts=8), "num_experts"),  # a field dsv4 does not understand
    (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(model_type="deepseek_v3"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types"),  # 3 entries for 4 layers
    (dict(layer_types=["full_attention"] * 4), "layer_types"),
    (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "mlp_layer_types"),  # hash layers must lead
    (dict(num_experts_per_tok=9), "n_activated_experts"),  # contradicts n_routed_experts=8
    (dict(partial_rotary_factor=1.5), "rope_head_dim"),  # 48 rotary dims in a 32-dim head
])
def test_bad_hf_config_names_the_field(change, field):
    hf = {**base_args().to_hf_config(), **change}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ModelArgs.from_hf_config(hf)


def test_hf_yarn_with_mscale_is_rejected():
    hf = base_args().to_hf_config()
    hf["rope_parameters"]["compress"]["mscale"] = 1.0
    with pytest.raises(ValueError, match="rope_parameters"):
        ModelArgs.from_hf_config(hf)


RELEASE_CONFIG = Path(__file__).parent / "data" / "v4_flash_release_config.json"


def test_release_config_json_reads_as_the_v4_flash_preset():
    """The config.json shipped with DeepSeek-V4-Flash (legacy `rope_scaling`, `compress_ratios` incl. the MTP
    layer, `num_hash_layers`, `qk_rope_head_dim`, `topk_method`) means exactly our v4-flash preset."""
    path = RELEASE_CONFIG
    assert ModelArgs.from_hf_config(path) == ModelArgs.from_name("v4-flash")


def test_unsupported_topk_method_is_rejected():
    cfg = json.loads(RELEASE_CONFIG.read_text())
    cfg["topk_method"] = "greedy"
    with pytest.raises(ValueError, match="topk_method"):
        ModelArgs.from_hf_config(cfg)
