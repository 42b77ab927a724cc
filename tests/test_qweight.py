"""Weight-only quantization kept in memory: the int8 / int4 formats against hand-worked values and error bounds, every
product of a QuantWeight against dequantize + F.linear, a quantized model's logits against full precision, and the
quantized checkpoint's round trip (the codes stay codes)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.cli import main
from dsv4.kernels import quant
from dsv4.kernels.fused import Fused, LinearGroup, Products, QuantLinear, fuse_linear_groups, prepare_decode
from dsv4.kernels.qweight import (
    FORMATS,
    QuantWeight,
    fitting_group,
    from_int4_kernel_layout,
    int4_kernel_layout,
    quantize,
)
from dsv4.model.quantized import quantize_model
from dsv4.weights.checkpoint import from_pretrained, save_pretrained
from tests.helpers import random_ids, random_model
from tests.test_engine import ckpt, model, tok  # the tiny model and tokenizer, saved as a checkpoint directory

# relative Frobenius error of a Gaussian matrix after a round trip: what each format's grid allows (with margin)
ROUND_TRIP = {"int8": 0.01, "int4": 0.11, "fp8": 0.04, "fp4": 0.13}


def test_int4_packs_every_code_low_nibble_first():
    codes = torch.arange(-8, 8, dtype=torch.float32).view(1, 16)  # the even input goes to the low nibble
    packed = quant._int4_codes(codes)
    assert packed[0, 0].item() == (-8 & 0xF) | ((-7 & 0xF) << 4) == 0x98
    assert packed[0, 4].item() == 0 | (1 << 4)  # codes 0 and 1
    torch.testing.assert_close(quant.unpack_int4(packed), codes, rtol=0, atol=0)


def test_int8_by_hand():
    w = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.5, -2.0]])
    q, s = quant.quant_int8(w)
    torch.testing.assert_close(s, torch.tensor([0.01, 2 / 127]))
    assert q.tolist() == [[127, -64, 0], [0, 32, -127]]  # -63.5 rounds half to even: -64


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 4), seed=st.integers(0, 2**16), spread=st.floats(0.01, 100))
def test_error_bounds(rows, groups, seed, spread):
    """int8: every weight within half a step of its row's grid. int4: within half a step of its group's grid where
    the group's scale did not clip it, and no clipped weight beyond the clip point by more than its amax allows."""
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed)) * spread
    q, s = quant.quant_int8(w)
    assert ((quant.dequant_int8(q, s) - w).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    packed, s4 = quant.quant_int4(w, 32)
    err = (quant.dequant_int4(packed, s4) - w).abs().unflatten(-1, (groups, 32))
    step = s4.float()[..., None]
    inside = w.unflatten(-1, (groups, 32)).abs() <= 7 * step
    assert (err[inside] <= step.expand_as(err)[inside] / 2 * (1 + 1e-2)).all()
    amax = w.unflatten(-1, (groups, 32)).abs().amax(-1, keepdim=True)
    assert (err <= amax * (1 - min(quant.CLIP_RATIOS)) + step).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error(fmt):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    qw = quantize(w, fmt)
    assert (qw.dequantize() - w).norm() / w.norm() < ROUND_TRIP[fmt]
    assert qw.shape == w.shape
    bits = {"int8": 8, "int4": 4, "fp8": 8, "fp4": 4}[fmt]
    assert bits / 8 <= qw.nbytes / w.numel() <= bits / 8 * 1.13  # codes + scales, nothing dense kept


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_dequantized_matrix(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    qw = quantize(torch.randn(3, 128, 64, generator=g), fmt)
    x = torch.randn(5, 64, generator=g).to(dtype)
    dense = qw.dequantize(torch.float32)
    tol = dict(rtol=2e-2, atol=0.15) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)  # outputs ~8
    one = qw[1]
    torch.testing.assert_close(Products.linear(x, one).float(), x.float() @ dense[1].T, **tol)
    torch.testing.assert_close(Fused.linear(x, one).float(), x.float() @ dense[1].T, **tol)
    picked = qw[torch.tensor([2, 0, 2, 1, 0])]  # each row through its own expert, codes read in place
    want = torch.einsum("ai,aoi->ao", x.float(), dense[[2, 0, 2, 1, 0]])
    torch.testing.assert_close(Products.gathered_linear(x, picked).float(), want, **tol)
    torch.testing.assert_close(Fused.gathered_linear(x, picked).float(), want, **tol)
    R = 128 if fmt == "fp8" else 64  # rows per group: fp8 splits into whole 128-row blocks only
    flat = quantize(torch.randn(256, 64, generator=g), fmt)
    groups = flat.split_rows(256 // R)  # [G, R, 64]: a block-diagonal projection's groups
    xg = x[:, None].expand(5, 256 // R, 64)
    want = torch.einsum("agi,goi->ago", xg.float(), flat.dequantize().view(256 // R, R, 64))
    torch.testing.assert_close(Products.grouped_linear(xg, groups).float(), want, **tol)
    torch.testing.assert_close(Fused.grouped_linear(xg, groups).float(), want, **tol)


def test_selections_compose_and_need_stacked_matrices():
    qw = quantize(torch.randn(6, 64, 32, generator=torch.Generator().manual_seed(5)), "int8")
    dense = qw.dequantize()
    torch.testing.assert_close(qw[torch.tensor([5, 1, 3])][torch.tensor([2, 0])].dequantize(), dense[[3, 5]])
    torch.testing.assert_close(qw[torch.tensor([5, 1, 3])][1].dequantize(), dense[1])
    with pytest.raises(ValueError, match="selects among stacked matrices"):
        qw[0][torch.tensor([1])]
    with pytest.raises(ValueError, match="do not split into 4 groups of 32 rows"):
        quantize(torch.randn(128, 64), "fp8").split_rows(4)


def test_int8_uses_the_packed_kernel(monkeypatch):
    """The eager int8 product goes to torch's int8-weight kernel (no dense copy of the matrix)."""
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[1].dtype) or real(*a))
    monkeypatch.setattr(QuantWeight, "dequantize", lambda *a: pytest.fail("int8 linear decoded its matrix"))
    quantize(torch.randn(8, 16), "int8").linear(torch.randn(2, 3, 16))
    assert calls == [torch.int8]


@pytest.mark.parametrize("isa,kernel", [("AVX512", False), ("AVX2", True), ("DEFAULT", True)])
def test_compiled_int8_takes_the_kernel_where_the_loop_reads_codes_partially(monkeypatch, isa, kernel):
    """A compiled step decodes int8 in its multiply-and-sum loop on AVX512 and calls torch's kernel on a CPU with
    narrower vectors (dsv4.device.vectorizes_int8); both give the decoded matrix's product."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    g = torch.Generator().manual_seed(7)
    qw = quantize(torch.randn(3, 24, 32, generator=g), "int8")
    x = torch.randn(2, 32, generator=g)
    idx = torch.tensor([2, 0])
    calls, real = [], torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[1].shape) or real(*a))
    y = Fused.linear(x, qw[1])
    yg = Fused.gathered_linear(x, qw[idx])
    assert calls == ([(24, 32)] * 3 if kernel else [])  # one matrix, then each of the two rows' experts
    dense = qw.dequantize()
    torch.testing.assert_close(y, x @ dense[1].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(yg, torch.einsum("ai,aoi->ao", x, dense[idx]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_group_of_quantized_layers(fmt):
    """Quantized layers that share an input still run as one product, with the same outputs."""
    model = random_model()
    quantize_model(model, fmt)
    group: LinearGroup = model.layers[1].attn.x_group
    x = torch.randn(2, 3, model.args.dim)
    separate = [m(x) for m in group.linears]
    fuse_linear_groups(model)
    if fmt != "fp8":  # tiny's projections are not whole 128-row blocks: fp8 stays separate
        assert isinstance(group.block, QuantWeight)
    for a, b in zip(group(x), separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def dequantized_twin(model, quantized):
    """A dense copy of `model` whose weights are the quantized model's, decoded."""
    twin = copy.deepcopy(model)
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in twin.named_modules():
            q = layers[name]
            if isinstance(q, QuantLinear):
                m.weight.copy_(q.matrix().dequantize())
            elif getattr(q, "fmt", None) and hasattr(q, "w13"):
                m.w13.copy_(q.matrix("w13").dequantize())
                m.w2.copy_(q.matrix("w2").dequantize())
    return twin


def test_quantized_model_logits_close_to_full_precision():
    """Each format's logits are exactly those of its decoded weights (nothing else changes), and their distance from
    full precision follows the formats' precision. The random tiny model is chaotic (Gaussian noise of int8's step
    size moves its logits ~9%), so the bounds are loose; the ordering is what holds."""
    model = random_model()
    ids = random_ids(model.args, 2, 40)
    error = {}
    with torch.no_grad():
        want = model(ids)
        for fmt in FORMATS:
            q = copy.deepcopy(model)
            report = quantize_model(q, fmt)
            assert not report.dense  # tiny's dims all divide into the groups
            assert ("head" in report.quantized) == (fmt in ("int8", "fp8"))  # the 4-bit formats keep it dense
            assert isinstance(q.layers[0].attn.wq_a, QuantLinear)
            assert q.layers[0].ffn.experts.w13.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
            got = q(ids)
            twin = dequantized_twin(model, q)
            torch.testing.assert_close(got, twin(ids), rtol=1e-4, atol=1e-4)
            one = ids[:1, :1]  # one token: the routed experts' gathered path (2 of 8 chosen, read in place)
            torch.testing.assert_close(q(one), twin(one), rtol=1e-4, atol=1e-4)
            error[fmt] = ((got - want).norm() / want.norm()).item()
            with pytest.raises(ValueError, match="already quantized"):
                quantize_model(q, fmt)
    assert error["int8"] < error["fp8"] < min(error["int4"], error["fp4"]) < 0.8, error
    assert error["int8"] < 0.15, error


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        quantize_model(random_model(), "int3")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, fmt):
    """save -> load keeps the codes (the loaded model holds int8 / packed bytes, not dense weights) and the logits."""
    model = random_model()
    report = quantize_model(model, fmt, group=64 if fmt == "int4" else 32)
    ids = random_ids(model.args, 1, 24)
    with torch.no_grad():
        want = model(ids)
    with pytest.raises(ValueError, match="dsv4 layout"):
        save_pretrained(model, tmp_path / "hf")
    save_pretrained(model, tmp_path / "q", layout="dsv4")
    loaded = from_pretrained(tmp_path / "q").eval()
    assert loaded.quantization == {"quant_method": "dsv4", "format": fmt, "group_size": 64 if fmt == "int4" else 32}
    assert loaded.layers[2].attn.wq_a.weight.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    torch.testing.assert_close(loaded.layers[2].attn.wq_a.scale, model.layers[2].attn.wq_a.scale, rtol=0, atol=0)
    if fmt == "int4":  # q_lora_rank 32 does not divide into groups of 64: wq_b falls back to groups of 32
        assert loaded.layers[2].attn.wq_b.matrix().group == 32 and loaded.layers[2].attn.wq_a.matrix().group == 64
        assert not report.dense
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), want, rtol=0, atol=0)
    dense = sum(p.numel() * p.element_size() for p in random_model().state_dict().values())
    stored = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    assert stored < dense * (0.45 if fmt == "int8" else 0.35)


def test_fp8_codes_load_as_codes(tmp_path):
    model = random_model()
    quantize_model(model, "fp8")
    save_pretrained(model, tmp_path / "q", layout="dsv4")
    loaded = from_pretrained(tmp_path / "q")
    assert loaded.layers[0].attn.wkv.weight.dtype == torch.float8_e4m3fn
    ids = random_ids(model.args, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_compute_dtype_follows_the_load():
    model = random_model().to_dtype(torch.bfloat16)
    quantize_model(model, "int8")
    assert model.layers[0].attn.wq_a.dtype == torch.bfloat16
    ids = random_ids(model.args, 1, 8)
    with torch.no_grad():
        assert model(ids).isfinite().all()
    x = torch.randn(4, model.args.dim, dtype=torch.bfloat16)
    torch.testing.assert_close(model.layers[0].attn.wq_a(x).float(),
                               F.linear(x.float(), model.layers[0].attn.wq_a.matrix().dequantize()),
                               rtol=2e-2, atol=2e-2)


def test_int4_kernel_layout_is_torchs_and_round_trips():
    w = torch.randn(3, 128, 96, generator=torch.Generator().manual_seed(2))
    qw = quantize(w, "int4")
    packed, pairs = int4_kernel_layout(qw.codes, qw.scale)
    unsigned = (quant.unpack_int4(qw.codes[1]) + 8).to(torch.int32)
    assert torch.equal(packed[1], torch._convert_weight_to_int4pack_for_cpu(unsigned, 2))
    assert pairs.shape == (3, 3, 128, 2) and not pairs[..., 1].any()
    back = from_int4_kernel_layout(packed, pairs)
    assert torch.equal(back[0], qw.codes) and torch.equal(back[1], qw.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_products_match_the_portable_ones(dtype):
    g = torch.Generator().manual_seed(3)
    portable = quantize(torch.randn(4, 128, 64, generator=g), "int4")
    laid = portable.to_kernel()
    assert laid.kernel and laid.group == portable.group == 32 and laid.shape == portable.shape
    torch.testing.assert_close(laid.dequantize(), portable.dequantize(), rtol=0, atol=0)
    x = torch.randn(5, 64, generator=g).to(dtype)
    tol = dict(rtol=2e-2, atol=0.15) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    idx = torch.tensor([3, 0, 3, 1, 2])
    want = torch.einsum("ai,aoi->ao", x.float(), portable.dequantize()[idx])
    torch.testing.assert_close(laid[idx].gathered(x).float(), want, **tol)
    torch.testing.assert_close(Fused.gathered_linear(x, laid[idx]).float(), want, **tol)
    torch.testing.assert_close(laid[2].linear(x).float(), x.float() @ portable.dequantize()[2].T, **tol)
    torch.testing.assert_close(Fused.linear(x, laid[2]).float(), x.float() @ portable.dequantize()[2].T, **tol)
    assert not quantize(torch.randn(96, 64), "int4").to_kernel().kernel  # rows not in whole blocks of 64: as is


def test_prepared_int4_model_keeps_its_logits_and_is_not_saved(tmp_path):
    model = random_model()
    quantize_model(model, "int4")
    ids = random_ids(model.args, 2, 24)
    with torch.no_grad():
        want = model(ids)
        prepare_decode(model)
        assert model.layers[0].ffn.experts.kernel_layout  # 128 rows: laid out
        assert model.layers[0].attn.wq_b.kernel_layout
        assert not model.layers[0].attn.wq_a.kernel_layout  # 32 rows: stays portable
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="before it is prepared"):
        save_pretrained(model, tmp_path / "x", layout="dsv4")


def test_quantize_command_writes_a_checkpoint_every_command_opens(ckpt, capsys, tmp_path):
    """`dsv4 quantize`: the copy holds codes, the tokenizer and config travel, the report lists what was done; info
    and generate open it; it refuses to write over its source or to quantize twice."""
    out = tmp_path / "int4"
    assert main(["quantize", "--ckpt", str(ckpt), "--to", "int4", "-o", str(out), "--group", "32"]) == 0
    assert "int4:" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    report = json.loads((out / "quantization.json").read_text())
    assert report["bytes_after"] < 0.4 * report["bytes_before"] and "layers.0.ffn.experts" in report["quantized"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int4"
    assert main(["info", "--ckpt", str(out)]) == 0
    assert "kept quantized in memory: int4, 32 inputs per scale" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(out), "def f(x):", "--max-new-tokens", "4", "--no-compile"]) == 0
    assert main(["quantize", "--ckpt", str(out), "--to", "int8", "-o", str(tmp_path / "again")]) == 2
    assert "already quantized (int4)" in capsys.readouterr().err
    assert main(["quantize", "--ckpt", str(ckpt), "--to", "int8", "-o", str(ckpt)]) == 2
    assert "not over its source" in capsys.readouterr().err


def test_groups_fall_back_to_one_that_divides_the_input():
    assert [fitting_group("int4", n, 32) for n in (64, 96, 104, 48, 12, 7)] == [32, 32, 8, 16, None, None]
    assert fitting_group("fp4", 104) == 8 and fitting_group("int8", 7) == 0 and fitting_group("fp8", 7) == 0
    w = torch.randn(64, 104, generator=torch.Generator().manual_seed(4))
    for fmt in ("int4", "fp4"):
        qw = quantize(w, fmt)
        assert qw.group == 8 and (qw.dequantize() - w).norm() / w.norm() < ROUND_TRIP[fmt]
        assert not qw.to_kernel().kernel  # the int4 kernel takes groups of 32 and up only
    with pytest.raises(ValueError, match="no group of 8 or more inputs divides 12"):
        quantize(torch.randn(4, 12), "int4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_matrices_quantize_a_few_at_a_time_exactly(fmt):
    """Experts go through the quantizer in chunks (V4-Flash's would not fit int4's clip search at once): the same
    codes and scales as all at once, for chunks of one matrix, of two, and of a part of the stack's last chunk."""
    w = torch.randn(2, 5, 128, 64, generator=torch.Generator().manual_seed(6))
    whole = quantize(w, fmt, 32)
    for chunk in (128 * 64, 2 * 128 * 64, 3 * 128 * 64):
        part = quantize(w, fmt, 32, chunk=chunk)
        assert part.codes.shape == whole.codes.shape and part.scale.shape == whole.scale.shape
        assert torch.equal(part.codes.view(torch.uint8), whole.codes.view(torch.uint8))
        assert torch.equal(part.scale, whole.scale)


@pytest.mark.parametrize("fmt,tied", [("int8", True), ("int4", False)])
def test_quantize_streams_one_block_at_a_time(tmp_path, monkeypatch, fmt, tied):
    """dsv4 quantize reads, quantizes and writes one piece at a time (every other block stays on `meta`), into
    several shards, and writes exactly what quantizing the whole loaded model gives; a tied head meets its embedding
    (int8 unties it by quantizing it, int4 keeps it dense and tied)."""
    from dsv4.weights import convert

    model = random_model(0, tie_embeddings=tied, engram_layers=[1], engram_vocab=[97, 101], engram_dim=32,
                         engram_heads=2)
    save_pretrained(model, tmp_path / "dense")
    live, real = [], convert.read_into

    def read_into(model, reading, mmap=frozenset(), only=None):
        live.append({".".join(n.split(".")[:2]) if n.startswith(("layers.", "mtp.")) else "rest"
                     for n, t in model.state_dict().items() if t.device.type != "meta"})
        real(model, reading, mmap, only)

    monkeypatch.setattr(convert, "read_into", read_into)
    report = convert.quantize_checkpoint(tmp_path / "dense", tmp_path / "q", fmt, group=32, max_shard_bytes=2**17,
                                         progress=False)
    assert live == [{"rest"}] + [{f"layers.{i}"} for i in range(len(model.layers))] + \
        [{f"mtp.{j}"} for j in range(len(model.mtp))]
    assert report["shards"] > 2 and len(list((tmp_path / "q").glob("model-*.safetensors"))) == report["shards"]
    want = from_pretrained(tmp_path / "dense")
    quantize_model(want, fmt, 32)
    got = from_pretrained(tmp_path / "q")
    assert got.state_dict().keys() == want.state_dict().keys()
    for name, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name
    assert (got.head.weight is got.embed.weight) == (tied and fmt == "int4")
