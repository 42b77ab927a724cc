"""The block-scaled FP8 and FP4 weight formats of the DeepSeek-V4 release: exact dequantisation, and the inverse.

FP8 (most linear weights): e4m3 values with one scale per 128x128 block of the last two dims (ragged last blocks):
    W[i, j] = q[i, j] * s[i // 128, j // 128]      q: [.., M, N] float8_e4m3fn   s: [.., ceil(M/128), ceil(N/128)]
FP4 (routed experts): e2m1 codes packed two per byte along the input dim, low nibble first, one scale per 32 inputs:
    W[i, 2k]   = E2M1[b[i, k] & 0xF] * s[i, 2k // 32]     b: [.., out, in/2] int8 (or float4_e2m1fn_x2)
    W[i, 2k+1] = E2M1[b[i, k] >> 4]  * s[i, (2k+1) // 32] s: [.., out, ceil(in/32)]
    E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6] for codes 0..7; bit 3 is the sign.
Scales are stored as float8_e8m0fnu ("ue8m0": the byte e means 2^(e-127), 255 is NaN) or as float32; the multiplier is
the stored value itself (the HF name `weight_scale_inv` notwithstanding, nothing is inverted).

Sources: DeepSeek-V4-Flash `inference/convert.py` (FP4_TABLE, `low = x & 0x0F; high = x >> 4`, stacked low then high;
scale [out, in/32]), `inference/model.py` (Linear: float4_e2m1fn_x2 weight [out, in/2], e8m0 scale [out, in/32];
FP8 weight with a 128x128 block scale) and the release's safetensors headers (F8_E4M3 weights with F8_E8M0 `.scale`,
I8 experts, e.g. layers.0.ffn.experts.0.w1 I8 [2048, 2048] with scale [2048, 128]).
"""

import math

import torch

FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
FP8_MAX = 448.0  # largest finite e4m3fn
FP4_MAX = 6.0  # largest e2m1
# code -> value; a tuple so it cannot be mutated (tensors are made per call on the caller's device)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP4_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Stored scale -> fp32 multiplier. ue8m0 is decoded from its bits so no device needs e8m0 arithmetic."""
    if scale.dtype == torch.float8_e8m0fnu:
        e = scale.view(torch.uint8).float()
        return torch.where(e == 255, torch.nan, torch.exp2(e - 127))
    return scale.float()


def _expand(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """[.., R, C] per-block scales -> [.., rows, cols], each entry repeated over its block, ragged edges cut."""
    s = scale_to_float(scale)
    return s.repeat_interleave(block_rows, dim=-2)[..., :rows, :].repeat_interleave(block_cols, dim=-1)[..., :cols]


def fp8_scale_shape(shape, block: tuple[int, int] = FP8_BLOCK) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))


def fp4_scale_shape(packed_shape, block: int = FP4_BLOCK) -> tuple[int, ...]:
    *lead, out, half = packed_shape
    return (*lead, out, math.ceil(2 * half / block))


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """[.., M, N] e4m3 (or e5m2) + block scales -> fp32 [.., M, N]."""
    expected = fp8_scale_shape(q.shape, block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 weight {tuple(q.shape)} with {block[0]}x{block[1]} blocks needs a scale of shape "
                         f"{expected}, got {tuple(scale.shape)}")
    *_, m, n = q.shape
    return q.float() * _expand(scale, m, n, *block)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[.., out, in/2] packed bytes -> fp32 e2m1 values [.., out, in] (low nibble is the even input)."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)  # [.., out, in/2, 2] -> [.., out, in]
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """[.., out, in/2] packed e2m1 + per-`block` input scales -> fp32 [.., out, in]."""
    expected = fp4_scale_shape(packed.shape, block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP4 weight {tuple(packed.shape)} (packed, {block} inputs per scale) needs a scale of "
                         f"shape {expected}, got {tuple(scale.shape)}")
    w = unpack_fp4(packed)
    return w * _expand(scale, w.shape[-2], w.shape[-1], 1, block)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, fp8_block: tuple[int, int] = FP8_BLOCK,
               fp4_block: int = FP4_BLOCK) -> torch.Tensor:
    """Either format, told apart by the stored dtype (e4m3/e5m2 -> FP8; int8/uint8/e2m1x2 bytes -> packed FP4)."""
    if weight.dtype in FP8_DTYPES:
        return dequant_fp8(weight, scale, fp8_block)
    if weight.dtype in FP4_DTYPES:
        return dequant_fp4(weight, scale, fp4_block)
    raise ValueError(f"a weight with a quantization scale must be float8 or packed fp4 bytes, got {weight.dtype}")


# --- the inverse: used to write release-format checkpoints and to test the loaders ---
def _pow2_scale(amax: torch.Tensor, qmax: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """Smallest scale with amax / scale <= qmax; ue8m0 rounds it up to a power of two, as the release does."""
    s = (amax.float() / qmax).clamp_min(2.0 ** -126)
    if scale_dtype == torch.float8_e8m0fnu:
        return torch.exp2(torch.ceil(torch.log2(s))).to(scale_dtype)
    return s.to(scale_dtype)


def quant_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
              scale_dtype: torch.dtype = torch.float8_e8m0fnu) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., M, N] float -> (e4m3 [.., M, N], block scales [.., ceil(M/bm), ceil(N/bn)])."""
    m, n = w.shape[-2:]
    bm, bn = block
    pad = torch.nn.functional.pad(w.float(), (0, -n % bn, 0, -m % bm))  # zeros never raise a block's amax
    blocks = pad.unflatten(-2, (-1, bm)).unflatten(-1, (-1, bn))  # [.., M/bm, bm, N/bn, bn]
    s = _pow2_scale(blocks.abs().amax(dim=(-3, -1)), FP8_MAX, scale_dtype)
    q = (w.float() / _expand(s, m, n, bm, bn)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK,
              scale_dtype: torch.dtype = torch.float8_e8m0fnu) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., out, in] float (in even) -> (packed int8 [.., out, in/2], scales [.., out, ceil(in/block)]).
    Each value goes to the nearest e2m1 code of w / scale."""
    out, n = w.shape[-2:]
    if n % 2:
        raise ValueError(f"FP4 packs two inputs per byte; the input dim must be even, got {n}")
    pad = torch.nn.functional.pad(w.float(), (0, -n % block))
    s = _pow2_scale(pad.unflatten(-1, (-1, block)).abs().amax(-1), FP4_MAX, scale_dtype)
    x = w.float() / _expand(s, out, n, 1, block)
    table = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=w.device)
    codes = (x.abs().unsqueeze(-1) - table).abs().argmin(-1)  # magnitude code 0..7
    codes = codes | ((x < 0).long() << 3)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed.view(torch.int8), s


# --- weight-only integer formats (`dsv4 quantize`): symmetric, per output row (int8) or per group of inputs (int4) ---
INT8_MAX = 127
INT4_MAX = 7  # codes -8..7 as two's-complement nibbles; the quantizer uses -7..7 so the grid is symmetric
INT4_GROUP = 32
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # int4 tries these fractions of each group's amax, keeps the least error


def quant_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., out, in] float -> (int8 codes [.., out, in], fp32 scales [.., out]):  W ~= q * s[:, None],
    s = amax(row) / 127, so every row uses the whole grid and the error of a weight is at most s / 2."""
    s = (w.float().abs().amax(-1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w.float() / s[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


def dequant_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def _int4_codes(q: torch.Tensor) -> torch.Tensor:
    """[.., out, in] integers in -8..7 -> [.., out, in/2] uint8, the even input in the low nibble (as FP4 packs)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[.., out, in/2] uint8 -> the signed codes [.., out, in] as fp32 (a nibble n >= 8 is n - 16)."""
    b = packed.view(torch.uint8).to(torch.int16)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    return (nibbles - ((nibbles & 0x8) << 1)).float()


def quant_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., out, in] float (in a multiple of `group`, `group` even) -> (uint8 codes [.., out, in/2],
    bf16 scales [.., out, in/group]):  W[o, i] ~= q[o, i] * s[o, i // group]. Each group's scale is amax * r / 7
    for the clip ratio r in CLIP_RATIOS with the least squared error (clipping a few outliers buys a finer grid)."""
    out, n = w.shape[-2:]
    if n % group or group % 2:
        raise ValueError(f"int4 groups of {group} inputs need an even group that divides the input dim, got {n}")
    g = w.float().unflatten(-1, (n // group, group))  # [.., out, G, group]
    amax = g.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    ratios = torch.tensor(CLIP_RATIOS, device=w.device).view(-1, *([1] * amax.dim()))
    s = (amax * ratios / INT4_MAX).to(torch.bfloat16).float()  # the scale as stored: error measured with it
    q = torch.round(g / s[..., None]).clamp(-INT4_MAX - 1, INT4_MAX)  # [R, .., out, G, group]
    best = ((q * s[..., None] - g) ** 2).sum(-1).argmin(0)  # [.., out, G]
    q = q.gather(0, best[None, ..., None].expand(1, *g.shape))[0]
    s = s.gather(0, best[None])[0]
    return _int4_codes(q.flatten(-2)), s.to(torch.bfloat16)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed)
    group = q.shape[-1] // scale.shape[-1]
    return (q.unflatten(-1, (-1, group)) * scale.float()[..., None]).flatten(-2)
