"""Checkpoint IO: name maps against transformers' real module names, round trips through transformers both ways,
a synthetic DeepSeek-release checkpoint (renamed, experts split, FP8 + FP4, several shards), errors, atomic saves."""

import json
import math
import os
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4 import ModelArgs, Transformer, save_pretrained
from dsv4.weights.checkpoint import (
    INDEX_FILE,
    Target,
    detect_layout,
    export,
    from_pretrained,
    load_state_dict,
    resolve,
    save_pretrained,
    to_layout_name,
)
from tests.helpers import random_model, tiny_args
from tests.test_quant import ref_dequant_fp4, ref_dequant_fp8

transformers = pytest.importorskip("transformers")


def write_checkpoint(path, tensors: dict, config: dict, n_shards: int = 1, order=None):
    """Shards + index + config.json written directly with safetensors (no dsv4 code)."""
    os.makedirs(path, exist_ok=True)
    names = order or sorted(tensors)
    per = math.ceil(len(names) / n_shards)
    weight_map = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(chunk, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def stored_names(path) -> set[str]:
    names = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                names |= set(h.keys())
    return names


def assert_same_state(model: Transformer, expected: dict):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


# --- name maps -------------------------------------------------------------------------------------------------------
def test_hf_names_are_exactly_transformers_state_dict():
    args = tiny_args()
    with torch.device("meta"):
        ours = Transformer(args)
        theirs = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**args.to_hf_config()))
    hf_names = {to_layout_name(n, "hf") for n in ours.state_dict() if not n.startswith("mtp.")}
    assert hf_names == set(theirs.state_dict())
    # a few by hand, from the spec
    assert to_layout_name("layers.1.attn.indexer.compressor.ape", "hf") == \
        "model.layers.1.self_attn.compressor.indexer.position_bias"
    assert to_layout_name("layers.0.ffn.gate.bias", "hf") == "model.layers.0.mlp.gate.e_score_correction_bias"
    assert to_layout_name("mtp.0.hc_head.fn", "hf") == "mtp.0.hc_head.hc_fn"
    assert to_layout_name("mtp.0.attn.wq_a.weight", "hf") == "mtp.0.self_attn.q_a_proj.weight"
    assert to_layout_name("layers.2.hc_ffn.scale", "upstream") == "layers.2.hc_ffn_scale"
    assert to_layout_name("hc_head.base", "upstream") == "hc_head_base"


def test_every_layout_name_resolves_back():
    with torch.device("meta"):
        model = Transformer(tiny_args())
    for name in model.state_dict():
        for layout in ("hf", "dsv4", "upstream"):
            assert resolve(to_layout_name(name, layout)) == Target(name), (name, layout)
    assert resolve("layers.2.ffn.experts.5.w3.weight") == Target("layers.2.ffn.experts.w13", 5, "w3")
    assert resolve("model.layers.2.mlp.experts.5.down_proj.weight") == Target("layers.2.ffn.experts.w2", 5, "w2")
    # transformers' save_pretrained spells the attention kv_norm `norm`
    assert resolve("model.layers.0.self_attn.norm.weight") == Target("layers.0.attn.kv_norm.weight")
    assert resolve("model.layers.0.attn.norm.weight") == Target("layers.0.attn.kv_norm.weight")
    assert resolve("layers.0.attn.bogus.weight") is None
    assert detect_layout(["embed.weight", "layers.0.hc_attn_fn"]) == "upstream"


# --- transformers round trips ------------------------------------------------------------------------------------
def test_our_save_loads_in_transformers_and_back(tmp_path):
    model = random_model(seed=3)
    shards = save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    assert len(shards) > 2 and set(shards) | {"config.json", INDEX_FILE} == set(os.listdir(tmp_path))
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    for f in shards:  # every shard under the limit, unless it holds one tensor that alone exceeds it
        one = sum(v == f for v in index.values()) == 1
        assert one or os.path.getsize(tmp_path / f) < 100_000 + 10_000, f
    theirs, info = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    hf_state = theirs.state_dict()
    for name, t in model.state_dict().items():
        if not name.startswith("mtp."):
            assert torch.equal(hf_state[to_layout_name(name, "hf")].to(t.dtype), t), name
    assert_same_state(from_pretrained(tmp_path), model.state_dict())  # MTP included


def test_transformers_save_loads_in_ours(tmp_path):
    """A freshly built transformers model saves a hybrid layout (model. + release names, experts one by one)."""
    args = tiny_args()
    torch.manual_seed(0)
    theirs = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**args.to_hf_config()))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        for name, b in theirs.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, args.n_routed_experts, b.shape))
            elif name.endswith("bias"):
                b.normal_()
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = from_pretrained(tmp_path)
    assert ours.args.n_mtp_layers == 0
    hf_state = theirs.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(hf_state[to_layout_name(name, "hf")], t), name


def test_tied_embeddings_saved_once(tmp_path):
    model = random_model(seed=4, tie_embeddings=True)
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in stored_names(tmp_path)
    theirs, info = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(theirs.lm_head.weight, model.head.weight)
    ours = from_pretrained(tmp_path)
    assert ours.head.weight is ours.embed.weight
    assert torch.equal(ours.head.weight, model.head.weight)


def test_dtype_keeps_fp32_tensors(tmp_path):
    model = random_model(seed=5)
    save_pretrained(model, tmp_path, layout="dsv4")
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    state = ours.state_dict()
    assert state["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    for name in ("layers.0.hc_attn.fn", "layers.1.attn.compressor.ape", "layers.0.attn.attn_sink",
                 "layers.1.ffn.gate.bias", "layers.0.attn_norm.weight"):
        assert state[name].dtype == torch.float32, name
    assert state["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t.to(state[name].dtype)), name
    # RoPE tables (non-persistent) were rebuilt after to_empty
    assert torch.equal(ours.rope_compress.inv_freq, model.rope_compress.inv_freq)


# --- DeepSeek release layout ---------------------------------------------------------------------------------------
def upstream_name(name: str) -> str:
    """Release spelling, written here from the spec independently of dsv4.weights.checkpoint."""
    return re.sub(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3", name)


def e8m0_pow2(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax / qmax))).to(torch.float8_e8m0fnu)


def fp8_blocks(w: torch.Tensor, bm: int, bn: int, e8m0: bool):
    """Test-side FP8 quantizer: loop over (ragged) blocks."""
    rows, cols = math.ceil(w.shape[0] / bm), math.ceil(w.shape[1] / bn)
    s = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            s[i, j] = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs().max() / 448
    s = e8m0_pow2(s * 448, 448) if e8m0 else s
    full = s.float()[torch.arange(w.shape[0]) // bm][:, torch.arange(w.shape[1]) // bn]  # gather, not repeat
    return (w / full).to(torch.float8_e4m3fn), s


def dequant_fp4_bits(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Test-side FP4 decoder from the e2m1 bit fields (no table): sign | exponent (bias 1) | mantissa."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack((b % 16, b // 16), -1).flatten(-2)
    sign = 1 - 2 * (codes // 8)
    exp, man = (codes // 2) % 4, codes % 2
    mag = torch.where(exp == 0, 0.5 * man, (1 + man / 2) * torch.exp2(exp - 1.0))
    return sign * mag * s.float()[:, torch.arange(codes.shape[1]) // 32]


def fp4_rows(w: torch.Tensor):
    """Test-side FP4 quantizer: scale per 32 inputs, nearest e2m1 code, low nibble = even input."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    s = e8m0_pow2(w.unflatten(1, (-1, 32)).abs().amax(-1), 6.0)
    x = w / s.float().repeat_interleave(32, 1)
    codes = (x.abs()[..., None] - table).abs().argmin(-1) | ((x < 0).long() << 3)
    return (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).view(torch.int8), s


FP8_NAMES = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|e_proj|h_proj|shared_experts\.w[123])\.weight$")


def release_checkpoint(model: Transformer, block=(24, 40), e8m0=True, fp4_experts=True):
    """-> (tensors in the release layout, expected state_dict after dequantisation)."""
    tensors, expected = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name.endswith((".experts.w13", ".experts.w2")):
            expected[name] = torch.empty_like(t)
            prefix, inter = name.rsplit(".", 1)[0], t.shape[1] // 2
            for e in range(t.shape[0]):
                parts = {"w2": (t[e], (e,))} if name.endswith("w2") else \
                    {"w1": (t[e, :inter], (e, slice(0, inter))), "w3": (t[e, inter:], (e, slice(inter, None)))}
                for part, (w, idx) in parts.items():
                    key = f"{prefix}.{e}.{part}"
                    if fp4_experts:
                        packed, tensors[key + ".scale"] = fp4_rows(w)
                        # the release stores I8; torch's float4_e2m1fn_x2 (safetensors F4) holds the same bytes
                        tensors[key + ".weight"] = packed.view(torch.float4_e2m1fn_x2) if e % 2 else packed
                        expected[name][idx] = dequant_fp4_bits(*fp4_rows(w))
                    else:
                        tensors[key + ".weight"] = w.to(torch.bfloat16)
                        expected[name][idx] = w.to(torch.bfloat16).float()
        elif FP8_NAMES.search(name):
            q, s = fp8_blocks(t, *block, e8m0)
            tensors[name], tensors[name[: -len("weight")] + "scale"] = q, s
            expected[name] = ref_dequant_fp8(q, s, *block)
        elif name.endswith("norm.weight"):  # the release ships norms in bf16
            tensors[name] = t.to(torch.bfloat16)
            expected[name] = t.to(torch.bfloat16).float()
        else:
            tensors[upstream_name(name)] = t
            expected[name] = t
    return tensors, expected


def test_release_layout_fp8_fp4_shards(tmp_path):
    model = random_model(seed=6)
    tensors, expected = release_checkpoint(model)
    assert tensors["layers.0.ffn.experts.2.w1.weight"].dtype == torch.int8
    assert tensors["layers.0.ffn.experts.3.w1.weight"].dtype == torch.float4_e2m1fn_x2
    assert tensors["layers.0.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    packed, scale = tensors["layers.1.ffn.experts.2.w2.weight"], tensors["layers.1.ffn.experts.2.w2.scale"]
    assert torch.equal(dequant_fp4_bits(packed, scale), ref_dequant_fp4(packed, scale))  # the two test decoders agree
    config = {**model.args.to_hf_config(), "expert_dtype": "fp4",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "weight_block_size": [24, 40]}}  # ragged blocks on every tiny matrix
    # 3 shards; one weight and its scale in different shards
    order = sorted(set(tensors) - {"layers.0.attn.wq_a.scale"}) + ["layers.0.attn.wq_a.scale"]
    write_checkpoint(tmp_path, tensors, config, n_shards=3, order=order)
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert index["layers.0.attn.wq_a.scale"] != index["layers.0.attn.wq_a.weight"]
    ours = from_pretrained(tmp_path)
    assert_same_state(ours, expected)
    assert not torch.equal(expected["layers.0.attn.wq_a.weight"], model.state_dict()["layers.0.attn.wq_a.weight"])


def test_release_layout_with_inference_config(tmp_path):
    """DeepSeek's inference config.json (our field names + kernel options), float32 FP8 scales, bf16 experts."""
    model = random_model(seed=7)
    tensors, expected = release_checkpoint(model, block=(128, 128), e8m0=False, fp4_experts=False)
    config = {**model.args.to_dict(), "dtype": "fp8", "scale_fmt": None, "expert_dtype": None, "max_batch_size": 4}
    write_checkpoint(tmp_path, tensors, config, n_shards=2)
    assert_same_state(from_pretrained(tmp_path), expected)
    state = load_state_dict(tmp_path)
    assert torch.equal(state["layers.0.attn.wkv.weight"], expected["layers.0.attn.wkv.weight"])


def test_save_upstream_layout_round_trip(tmp_path):
    model = random_model(seed=8)
    save_pretrained(model, tmp_path, layout="upstream", max_shard_bytes=150_000)
    names = stored_names(tmp_path)
    assert {"embed.weight", "hc_head_fn", "layers.0.hc_attn_fn", "layers.0.ffn.experts.7.w3.weight",
            "mtp.0.hc_head_scale"} <= names and "layers.0.ffn.experts.w13" not in names
    assert_same_state(from_pretrained(tmp_path), model.state_dict())


def hf_tensors(model):
    return {name: t.clone() for name, t in export(model, "hf")}


def test_hf_layout_fp8_with_weight_scale_inv(tmp_path):
    """transformers-style FP8: `X.weight` e4m3 + `X.weight_scale_inv` (a multiplier despite the name)."""
    model = random_model(seed=18)
    tensors, expected = hf_tensors(model), dict(model.state_dict())
    for ours in ("layers.1.attn.wq_b.weight", "mtp.0.e_proj.weight"):
        name = to_layout_name(ours, "hf")
        q, s = fp8_blocks(tensors[name], 16, 16, e8m0=False)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        expected[ours] = ref_dequant_fp8(q, s, 16, 16)
    quantization = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    config = {**model.args.to_hf_config(), "quantization_config": quantization}
    write_checkpoint(tmp_path, tensors, config)
    assert_same_state(from_pretrained(tmp_path), expected)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_wrong_shape_reported_together(tmp_path):
    model = random_model(seed=9)
    tensors = hf_tensors(model)
    del tensors["model.layers.1.self_attn.q_a_proj.weight"]
    tensors["model.layers.0.self_attn.bogus.weight"] = torch.zeros(3)
    tensors["model.layers.2.mlp.gate.weight"] = torch.zeros(8, 65)
    write_checkpoint(tmp_path, tensors, model.args.to_hf_config(), n_shards=2)
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "1 missing: layers.1.attn.wq_a.weight [hf: model.layers.1.self_attn.q_a_proj.weight]" in msg
    assert "1 unexpected: model.layers.0.self_attn.bogus.weight" in msg
    assert "model.layers.2.mlp.gate.weight: checkpoint [8, 65], model [8, 64]" in msg


def test_missing_expert_and_bad_scales_in_release_layout(tmp_path):
    model = random_model(seed=10)
    tensors, _ = release_checkpoint(model, block=(128, 128))
    del tensors["layers.2.ffn.experts.5.w3.weight"], tensors["layers.2.ffn.experts.5.w3.scale"]
    tensors["layers.1.attn.wq_a.scale"] = tensors["layers.1.attn.wq_a.scale"].repeat(2, 1)
    del tensors["layers.0.attn.wo_b.scale"]
    write_checkpoint(tmp_path, tensors, model.args.to_dict())
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing: layers.2.ffn.experts.5.w3.weight" in msg
    assert "layers.1.attn.wq_a.scale: scale of layers.1.attn.wq_a.weight is [2, 1], expected [1, 1]" in msg
    assert "layers.0.attn.wo_b.weight is stored as F8_E4M3 but has no scale tensor" in msg


def test_long_lists_are_truncated(tmp_path):
    model = random_model(seed=11)
    tensors = {n: t for n, t in hf_tensors(model).items() if not n.startswith("model.layers.")}
    write_checkpoint(tmp_path, tensors, model.args.to_hf_config())
    with pytest.raises(ValueError, match=r"missing: .*\.\.\. and \d+ more") as err:
        from_pretrained(tmp_path)
    assert len(str(err.value)) < 5000


@pytest.mark.parametrize("kind", ["hf", "upstream"])
def test_bad_config_field_is_named(tmp_path, kind):
    model = random_model(seed=12)
    config = model.args.to_hf_config() if kind == "hf" else model.args.to_dict()
    config["hidden_sizze" if kind == "hf" else "dimm"] = 3
    write_checkpoint(tmp_path, hf_tensors(model), config)
    with pytest.raises(ValueError, match="hidden_sizze" if kind == "hf" else "dimm"):
        from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_args().to_hf_config(), f)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        from_pretrained(tmp_path)


# --- atomic saves ----------------------------------------------------------------------------------------------------
def test_resave_replaces_shards_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    small = save_pretrained(random_model(seed=13), target, max_shard_bytes=60_000)
    (target / "tokenizer.json").write_text("{}")  # not ours: must survive a re-save
    model = random_model(seed=14)
    big = save_pretrained(model, target)
    assert len(small) > 1 and big == ["model-00001-of-00001.safetensors"]
    assert set(os.listdir(target)) == {"config.json", INDEX_FILE, "tokenizer.json", *big}
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left
    assert_same_state(from_pretrained(target), model.state_dict())


def test_failed_save_leaves_target_untouched(tmp_path, monkeypatch):
    import dsv4.weights.shards as shards

    target = tmp_path / "ckpt"
    model = random_model(seed=15)
    save_pretrained(model, target)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    written, real = [], shards.save_file

    def boom(data, path, **k):  # the disk fills up at the third shard
        if len(written) == 2:
            raise OSError("disk full")
        written.append(path)
        real(data, path, **k)

    monkeypatch.setattr(shards, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(seed=16), target, max_shard_bytes=2**16)
    assert len(written) == 2
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_model_save_pretrained_method(tmp_path):
    model = random_model(seed=17)
    save_pretrained(model, tmp_path, layout="dsv4")
    assert "layers.0.ffn.experts.w13" in stored_names(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MTP weights present: no warning
        assert_same_state(from_pretrained(tmp_path), model.state_dict())
    assert ModelArgs.from_hf_config(tmp_path) == model.args


def test_release_formats_kept_packed(tmp_path):
    """keep_packed: FP8 linears with 128x128 blocks stay fp8 codes, FP4 experts stay packed bytes; the logits are
    exactly the decoded model's (the products decode the same values)."""
    from dsv4.kernels.fused import QuantLinear
    from tests.helpers import random_ids

    block = (128, 128)
    model = random_model(seed=8)
    tensors, _ = release_checkpoint(model, block=block)
    write_checkpoint(tmp_path, tensors, {**model.args.to_dict(), "dtype": "fp8"})
    dense, packed = from_pretrained(tmp_path), from_pretrained(tmp_path, keep_packed=True)
    wq_b, experts = packed.layers[1].attn.wq_b, packed.layers[1].ffn.experts
    assert experts.fmt == "fp4" and experts.w13.dtype == torch.uint8 and experts.w13_scale.dtype == torch.bfloat16
    assert isinstance(wq_b, QuantLinear) and wq_b.weight.dtype == torch.float8_e4m3fn
    assert packed.quantization == {"quant_method": "release", "formats": ["fp4", "fp8"]}
    ids = random_ids(model.args, 1, 24)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), dense(ids), rtol=1e-5, atol=1e-5)
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert size(packed) < 0.5 * size(dense)
