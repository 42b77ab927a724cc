"""FP8 / FP4 formats: dequantisation against values worked out by hand and by an independent loop-based reference,
ragged blocks, both scale dtypes, and the quantizers' error bounds."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv4.kernels import quant


def e2m1_from_bits(code: int) -> float:
    """The e2m1 value of a 4-bit code from its definition: sign | 2 exponent bits (bias 1) | 1 mantissa bit."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    mag = man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)  # exp 0 is subnormal
    return sign * mag


def e8m0(exponents) -> torch.Tensor:
    """Scales 2**e stored as ue8m0 bytes."""
    return torch.tensor([[e + 127 for e in row] for row in exponents], dtype=torch.uint8).view(torch.float8_e8m0fnu)


def ref_dequant_fp8(q: torch.Tensor, s: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Block by block, with the scale decoded by math.ldexp / float()."""
    s_bytes = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else None
    out = torch.empty(q.shape)
    for bi in range(math.ceil(q.shape[0] / bm)):
        for bj in range(math.ceil(q.shape[1] / bn)):
            scale = math.ldexp(1.0, int(s_bytes[bi, bj]) - 127) if s_bytes is not None else float(s[bi, bj])
            rows, cols = slice(bi * bm, (bi + 1) * bm), slice(bj * bn, (bj + 1) * bn)
            out[rows, cols] = q[rows, cols].float() * scale
    return out


def ref_dequant_fp4(packed: torch.Tensor, s: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Byte by byte: low nibble is input 2k, high nibble input 2k+1."""
    s_bytes = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else None
    rows, half = packed.shape
    out = torch.empty(rows, 2 * half)
    for i in range(rows):
        for k in range(half):
            byte = int(packed[i, k]) & 0xFF
            for j, code in ((2 * k, byte & 0xF), (2 * k + 1, byte >> 4)):
                b = j // block
                scale = math.ldexp(1.0, int(s_bytes[i, b]) - 127) if s_bytes is not None else float(s[i, b])
                out[i, j] = e2m1_from_bits(code) * scale
    return out


def test_e2m1_table_matches_the_bit_definition():
    assert [e2m1_from_bits(c) for c in range(16)] == list(quant.E2M1_VALUES)
    assert math.copysign(1.0, quant.E2M1_VALUES[8]) == -1.0  # code 8 is -0


def test_e8m0_decoding():
    s = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    got = quant.scale_to_float(s).tolist()
    assert got[:6] == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
    assert math.isnan(got[6])


def test_fp4_by_hand_low_nibble_first_and_ragged_scale_block():
    # 40 inputs -> 20 bytes; scales: inputs 0..31 use 2**1, inputs 32..39 (the ragged last block) use 2**-1
    packed = torch.zeros(2, 20, dtype=torch.uint8)
    packed[0, 0] = 0x21  # inputs 0, 1 = codes 1, 2 = 0.5, 1.0
    packed[0, 15] = 0xF7  # inputs 30, 31 = 6.0, -6.0
    packed[0, 16] = 0x9B  # inputs 32, 33 = codes 11, 9 = -1.5, -0.5
    packed[1, 19] = 0x5C  # inputs 38, 39 = codes 12, 5 = -2.0, 3.0
    scale = e8m0([[1, -1], [0, 3]])
    w = quant.dequant_fp4(packed.view(torch.int8), scale)
    expected = torch.zeros(2, 40)
    expected[0, :2] = torch.tensor([0.5, 1.0]) * 2
    expected[0, 30:32] = torch.tensor([6.0, -6.0]) * 2
    expected[0, 32:34] = torch.tensor([-1.5, -0.5]) * 0.5
    expected[1, 38:40] = torch.tensor([-2.0, 3.0]) * 8
    assert torch.equal(w, expected)
    # the same bytes seen as uint8 or as torch's float4_e2m1fn_x2 decode the same way
    assert torch.equal(quant.dequantize(packed, scale), expected)
    assert torch.equal(quant.dequantize(packed.view(torch.float4_e2m1fn_x2), scale), expected)


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_fp4_random_bytes_against_reference(scale_dtype):
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (5, 35), generator=g, dtype=torch.int8)  # 70 inputs: blocks 32, 32, 6
    if scale_dtype == torch.float32:
        scale = torch.rand(5, 3, generator=g) + 0.1
    else:
        scale = torch.randint(120, 135, (5, 3), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(quant.dequant_fp4(packed, scale), ref_dequant_fp4(packed, scale))


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((128, 256), (128, 128)), ((50, 70), (16, 32))])
def test_fp8_ragged_blocks_against_reference(shape, block, scale_dtype):
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(shape, generator=g) * 50).to(torch.float8_e4m3fn)
    sshape = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    if scale_dtype == torch.float32:
        scale = torch.rand(sshape, generator=g) + 0.01
    else:
        scale = torch.randint(110, 140, sshape, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(quant.dequant_fp8(q, scale, block), ref_dequant_fp8(q, scale, *block))


def test_leading_dims_dequantize_each_matrix():
    g = torch.Generator().manual_seed(2)
    q = (torch.randn(3, 130, 40, generator=g) * 10).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, 1, generator=g) + 0.5
    got = quant.dequant_fp8(q, s)
    for e in range(3):
        assert torch.equal(got[e], ref_dequant_fp8(q[e], s[e], 128, 128))


def test_scale_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        quant.dequant_fp8(torch.zeros(200, 300, dtype=torch.float8_e4m3fn), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        quant.dequant_fp4(torch.zeros(4, 20, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(ValueError, match="float8 or packed fp4"):
        quant.dequantize(torch.zeros(4, 4, dtype=torch.bfloat16), torch.ones(1, 1))


def ref_quant_fp4(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Independent quantizer: per block, scale 2**ceil(log2(amax/6)); each value to the nearest signed e2m1 value."""
    values = [e2m1_from_bits(c) for c in range(16)]
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        for b0 in range(0, w.shape[1], block):
            chunk = w[i, b0:b0 + block].tolist()
            scale = 2.0 ** math.ceil(math.log2(max(abs(x) for x in chunk) / 6))
            for j, x in enumerate(chunk):
                out[i, b0 + j] = min(values, key=lambda v: abs(v - x / scale)) * scale
    return out


def test_fp4_quantizer_matches_independent_reference():
    w = torch.randn(3, 72, generator=torch.Generator().manual_seed(3))
    packed, scale = quant.quant_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (3, 36) and scale.shape == (3, 3)
    assert torch.equal(quant.dequant_fp4(packed, scale), ref_quant_fp4(w))
    # nibble order on the bytes: amax 6 -> scale 1; 1.5 is code 3 (low nibble, first input), 6.0 code 7 (high)
    packed, scale = quant.quant_fp4(torch.tensor([[1.5, 6.0]]))
    assert int(packed.view(torch.uint8)[0, 0]) == 0x73 and quant.scale_to_float(scale).item() == 1.0


@given(rows=st.integers(1, 140), cols=st.integers(1, 70).map(lambda n: 2 * n), seed=st.integers(0, 2**16),
       e8m0_scales=st.booleans())
def test_quantizers_error_bounds(rows, cols, seed, e8m0_scales):
    scale_dtype = torch.float8_e8m0fnu if e8m0_scales else torch.float32
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q, s = quant.quant_fp8(w, scale_dtype=scale_dtype)
    s_full = quant._expand(s, rows, cols, 128, 128)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus half the subnormal spacing (2**-10) near zero
    assert ((quant.dequant_fp8(q, s) - w).abs() <= w.abs() * 2**-4 + s_full * 2**-10).all()
    assert (w.abs() <= s_full * quant.FP8_MAX * (1 + 1e-6)).all()  # no value was clipped
    p, s4 = quant.quant_fp4(w, scale_dtype=scale_dtype)
    s4_full = quant._expand(s4, rows, cols, 1, 32)
    # nearest e2m1 value: the widest gap is 4 -> 6, so the error is at most one scale unit
    assert ((quant.dequant_fp4(p, s4) - w).abs() <= s4_full * (1 + 1e-6)).all()
