"""A weight kept quantized in memory, and its products: what a quantized layer hands its product set instead of a
dense [out, in] matrix.

    fmt    codes                                   scale                                  W[o, i] =
    int8   int8 [.., out, in]                      fp32 [.., out]                         q[o, i] s[o]
    int4   uint8 [.., out, in/2] (low nibble even) bf16 [.., out, in/g]                   q[o, i] s[o, i // g]
    fp8    float8_e4m3fn [.., out, in]             fp32/ue8m0 [.., out/128, in/128]       q[o, i] s[o//128, i//128]
    fp4    uint8 [.., out, in/2] e2m1 codes        bf16/ue8m0 [.., out, in/32]            e2m1(q[o, i]) s[o, i // 32]
(dsv4.kernels.quant has the formats and their quantizers; `..` are leading dims, e.g. the routed experts.)

Three ways to multiply, each tested against `dequantize` + F.linear (tests/test_qweight.py):
    linear(x)     eager, up to KERNEL_MAX_ROWS rows: torch's quantized-weight kernels, which read the codes as stored:
                  int8 `torch._weight_int8pack_mm` (CPU, CUDA, MPS), int4 in the CPU kernel's layout
                  `torch._weight_int4pack_mm_for_cpu`; otherwise (more rows, other formats) the matrix is decoded into
                  x's dtype for one F.linear (prefill: the matrix is read once for many rows).
    matvec(x)     the multiply-and-sum of a compiled decode step (dsv4.kernels.fused.Fused): the codes are decoded
                  inside the loop that sums, so it reads 1 byte (int8, fp8) or half a byte (fp4) per weight instead of
                  bf16's 2. For int8 this beat the kernel inside the engine's compiled step (the kernel's calls split
                  the fused graph: 214 vs 160 tokens/s on `small`, bf16 192, medians of 3); int4's nibbles unpack too
                  slowly in such a loop, so a compiled step calls the int4 kernel.
    dequantize()  the dense matrix, for everything else (grouped expert GEMMs in prefill, batched matmuls).
`qw[idx]` selects along the leading dims without decoding (the chosen experts of a decode step).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.device import has_int4_weight_kernel, has_int8_weight_kernel, vectorizes_int8
from dsv4.kernels import quant

FORMATS = ("int8", "int4", "fp8", "fp4")
PACKED_FORMATS = ("int4", "fp4")  # two codes a byte along the input dim


@torch.library.custom_op("dsv4::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] through int8 codes [out, in] with fp32 row scales [out] -> [M, out] in x's dtype: torch's
    int8-weight kernel, which reads the codes as they are. A custom op so that a compiled step calls it as it is
    (inductor's own lowering of the kernel takes no computed scale)."""
    return torch._weight_int8pack_mm(x, codes, scale.to(x.dtype))


@int8_linear.register_fake
def _(x, codes, scale):
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("dsv4::int8_gathered", mutates_args=())
def int8_gathered(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row a of x [A, in] through matrix index[a] of codes [E, out, in] (scales [E, out]) -> [A, out]: the chosen
    experts of a decode step (A is a few), each read in place. A loop over the rows, inside one opaque op."""
    rows = [torch._weight_int8pack_mm(x[a: a + 1], codes[e], scale[e].to(x.dtype))
            for a, e in enumerate(index.tolist())]
    return torch.cat(rows) if rows else x.new_empty(0, codes.shape[1])


@int8_gathered.register_fake
def _(x, codes, scale, index):
    return x.new_empty(x.shape[0], codes.shape[1])


@torch.library.custom_op("dsv4::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, in] through int4 weights in the CPU kernel's layout (`int4_kernel_layout`) -> [M, out] in x's dtype."""
    return torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros.to(x.dtype))


@int4_linear.register_fake
def _(x, packed, scales_zeros, group):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("dsv4::int4_gathered", mutates_args=())
def int4_gathered(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, index: torch.Tensor,
                  group: int) -> torch.Tensor:
    """`int8_gathered` for int4 weights in the CPU kernel's layout: packed [E, out, in/2], scales [E, G, out, 2]."""
    rows = [torch._weight_int4pack_mm_for_cpu(x[a: a + 1], packed[e], group, scales_zeros[e].to(x.dtype))
            for a, e in enumerate(index.tolist())]
    return torch.cat(rows) if rows else x.new_empty(0, packed.shape[1])


@int4_gathered.register_fake
def _(x, packed, scales_zeros, index, group):
    return x.new_empty(x.shape[0], packed.shape[1])


KERNEL_ROWS = 64  # the int4 kernel's layout interleaves blocks of 64 output rows
KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes
# torch's quantized-weight kernels are matrix-vector kernels: past a few rows (a prefill chunk), decoding the matrix
# for one GEMM is faster (256 rows: the int8 and int4 kernels took twice as long as bf16's GEMM, 2-core EPYC)
KERNEL_MAX_ROWS = 16


def int4_kernel_layout(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int4 (signed nibbles, low = even input; scales [.., N, G]) -> the layout of torch's CPU int4 kernel
    (`torch._convert_weight_to_int4pack_for_cpu`, written out here so it works on any leading dims and is tested
    against that function): unsigned codes q + 8 where, for each block of 64 output rows, byte (k, j) of the block
    holds row j's input k in its low nibble and row j + 32's in its high one -> [.., N, K/2] uint8; and the scales
    as the kernel's (scale, zero) pairs [.., G, N, 2] (zero 0: dequantized w = (q - 8) * scale). N % 64 == 0."""
    q = (quant.unpack_int4(codes) + 8).to(torch.uint8)  # [.., N, K]
    *lead, n, k = q.shape
    v = q.view(*lead, n // KERNEL_ROWS, 2, KERNEL_ROWS // 2, k)
    packed = (v[..., 0, :, :] | (v[..., 1, :, :] << 4)).transpose(-1, -2).reshape(*lead, n, k // 2)
    s = scale.transpose(-1, -2)
    return packed.contiguous(), torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()


def from_int4_kernel_layout(packed: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `int4_kernel_layout`: -> (portable codes [.., N, K/2], scales [.., N, G])."""
    *lead, n, half = packed.shape
    b = packed.view(*lead, n // KERNEL_ROWS, half * 2, KERNEL_ROWS // 2).transpose(-1, -2)  # [.., N/64, 32, K]
    q = torch.stack((b & 0xF, b >> 4), dim=-3).reshape(*lead, n, half * 2).float() - 8
    return quant._int4_codes(q), scales_zeros[..., 0].transpose(-1, -2).contiguous()


@dataclass(frozen=True)
class QuantWeight:
    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor
    index: torch.Tensor | None = None  # a selection along the first dim, kept lazy: `qw[idx]` copies nothing
    kernel: bool = False  # int4 in the CPU kernel's layout (`int4_kernel_layout`; scale holds its scale/zero pairs)

    @property
    def shape(self) -> torch.Size:
        """The logical [.., out, in] shape."""
        s = self.codes.shape
        if self.index is not None:
            s = torch.Size((*self.index.shape, *s[1:]))
        return torch.Size((*s[:-1], 2 * s[-1])) if self.fmt in PACKED_FORMATS else s

    @property
    def group(self) -> int:
        """Inputs per scale along the input dim (int8: the whole row)."""
        if self.fmt == "fp8":
            return quant.FP8_BLOCK[1]
        if self.kernel:
            return self.shape[-1] // self.scale.shape[-3]
        return self.shape[-1] // (1 if self.fmt == "int8" else self.scale.shape[-1])

    def __getitem__(self, idx: torch.Tensor | int) -> "QuantWeight":
        """Select among stacked matrices (the first of >= 3 dims, e.g. `experts_w13[chosen]`): a tensor of indices
        lazily (the products read the chosen matrices in place), an int as that one matrix. Selections compose."""
        if self.codes.dim() < 3:
            raise ValueError(f"indexing selects among stacked matrices; this {self.fmt} weight is one matrix "
                             f"{list(self.shape)}")
        if self.index is not None:
            idx = self.index[idx]
        if isinstance(idx, int) or idx.dim() == 0:
            return QuantWeight(self.fmt, self.codes[idx], self.scale[idx], kernel=self.kernel)
        return QuantWeight(self.fmt, self.codes, self.scale, idx, self.kernel)

    def portable(self) -> "QuantWeight":
        """The same weight in the portable layout (a copy when it is in the kernel's)."""
        codes, scale = self.selected()
        if self.kernel:
            codes, scale = from_int4_kernel_layout(codes, scale)
        return QuantWeight(self.fmt, codes, scale)

    def to_kernel(self) -> "QuantWeight":
        """int4 in the CPU kernel's layout when that is possible (rows in whole blocks of 64), else itself."""
        if self.fmt != "int4" or self.kernel or self.index is not None or self.shape[-2] % KERNEL_ROWS \
                or self.group not in KERNEL_GROUPS:
            return self
        return QuantWeight(self.fmt, *int4_kernel_layout(self.codes, self.scale), kernel=True)

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale) with the selection applied (a gathered copy)."""
        if self.index is None:
            return self.codes, self.scale
        return self.codes[self.index], self.scale[self.index]

    def splits_rows(self, groups: int) -> bool:
        """Whether `split_rows(groups)` keeps the codes: always, but for fp8 whose groups are not whole 128-row
        blocks."""
        return self.fmt != "fp8" or (self.shape[-2] // groups) % quant.FP8_BLOCK[0] == 0

    def split_rows(self, groups: int) -> "QuantWeight":
        """[G*R, in] -> [G, R, in] (a block-diagonal projection's groups; see `splits_rows`)."""
        if not self.splits_rows(groups):
            raise ValueError(f"fp8's 128-row blocks do not split into {groups} groups of {self.shape[-2] // groups} "
                             f"rows; decode the weight first")
        w = self.portable()
        return QuantWeight(self.fmt, w.codes.unflatten(-2, (groups, -1)),
                           w.scale.unflatten(-1 if self.fmt == "int8" else -2, (groups, -1)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes, scale = self.portable().selected()
        if self.fmt == "int8":
            w = quant.dequant_int8(codes, scale)
        elif self.fmt == "int4":
            w = quant.dequant_int4(codes, scale)
        elif self.fmt == "fp8":
            w = quant.dequant_fp8(codes, scale)
        elif self.fmt == "fp4":
            w = quant.dequant_fp4(codes, scale, self.group)
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}; choose one of {FORMATS}")
        return w.to(dtype)

    def int8_kernel(self, x: torch.Tensor) -> bool:
        """Whether torch's int8-weight kernel takes this product (else the matrix is decoded)."""
        return (self.fmt == "int8" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and has_int8_weight_kernel(x.device))

    def int4_kernel(self, x: torch.Tensor) -> bool:
        return self.kernel and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and has_int4_weight_kernel(x.device)

    def kernel_over_loop(self, x: torch.Tensor) -> bool:
        """Whether a compiled step calls torch's kernel for this product rather than decoding the codes in its
        multiply-and-sum loop: int4 always (the loop cannot unpack nibbles quickly), int8 where the loop would read
        its codes with partial vector loads (a CPU without AVX512: see dsv4.device.vectorizes_int8)."""
        return self.int4_kernel(x) or (self.int8_kernel(x) and not vectorizes_int8(x.device))

    def fast(self, x: torch.Tensor) -> bool:
        """Whether one of torch's quantized-weight kernels takes this product (else the matrix is decoded)."""
        return self.int8_kernel(x) or self.int4_kernel(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out] in x's dtype (the eager product; see the module docstring)."""
        rows = x.shape[:-1].numel()
        if self.index is None and self.codes.dim() == 2 and rows <= KERNEL_MAX_ROWS and self.fast(x):
            x2 = x.reshape(rows, x.shape[-1]).contiguous()
            if self.scale.dtype == x.dtype:  # prepared (scales in the compute dtype): torch's op, called as it is
                y = (torch._weight_int8pack_mm(x2, self.codes, self.scale) if self.fmt == "int8"
                     else torch._weight_int4pack_mm_for_cpu(x2, self.codes, self.group, self.scale))
            else:
                y = (int8_linear(x2, self.codes, self.scale) if self.fmt == "int8"
                     else int4_linear(x2, self.codes, self.scale, self.group))
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize(x.dtype))

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Row a of x [A, in] through selected matrix a [A, out, in] -> [A, out] in x's dtype."""
        if self.index is not None and self.codes.dim() == 3 and self.fast(x):
            if self.fmt == "int8":
                return int8_gathered(x.contiguous(), self.codes, self.scale, self.index)
            return int4_gathered(x.contiguous(), self.codes, self.scale, self.index, self.group)
        return torch.bmm(x[:, None], self.dequantize(x.dtype).transpose(1, 2))[:, 0]

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] x [.., out, in] -> [..., out] fp32 as a multiply-and-sum with the codes decoded in the loop (the
        leading dims broadcast as in dsv4.kernels.fused.matvec). The per-row / per-group scale is applied once per
        row / group, after its sum."""
        codes, scale = self.portable().selected()
        x = x.unsqueeze(-2).float()  # [..., 1, in]
        if self.fmt == "int8":
            return (x * codes.float()).sum(-1) * scale.float()
        if self.fmt == "fp8":
            return (x * self.dequantize()).sum(-1)
        g = self.group  # x [..., 1, G, g/2, 2] against the even / odd codes of each byte [.., out, G, g/2]
        xe, xo = x.unflatten(-1, (-1, g // 2, 2)).unbind(-1)
        b = codes.view(torch.uint8).unflatten(-1, (-1, g // 2)).to(torch.int32)
        lo, hi = b & 0xF, b >> 4
        if self.fmt == "int4":
            lo, hi = (lo - ((lo & 0x8) << 1)).float(), (hi - ((hi & 0x8) << 1)).float()
        else:
            table = torch.tensor(quant.E2M1_VALUES, dtype=torch.float32, device=b.device)
            lo, hi = table[lo], table[hi]
        return ((xe * lo + xo * hi).sum(-1) * scale.float()).sum(-1)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


MIN_GROUP = 8  # the smallest group an input dim that the asked-for group does not divide falls back to


def fitting_group(fmt: str, in_features: int, group: int = quant.INT4_GROUP) -> int | None:
    """Inputs per scale for a matrix with `in_features` inputs: int4 `group`, fp4 32 (the release's), halved until it
    divides the input dim (e.g. 104 inputs -> 8) but never below MIN_GROUP; None if even that does not divide it.
    int8 and fp8 fit any width (0: not grouped)."""
    if fmt in ("int8", "fp8"):
        return 0
    g = group if fmt == "int4" else quant.FP4_BLOCK
    while g >= MIN_GROUP and in_features % g:
        g //= 2
    return g if g >= MIN_GROUP else None


QUANTIZE_CHUNK = 2**26  # weights a quantizer takes at once: int4's clip search holds several fp32 copies of them


def quantize(w: torch.Tensor, fmt: str, group: int = quant.INT4_GROUP, chunk: int = QUANTIZE_CHUNK) -> QuantWeight:
    """A dense [.., out, in] weight -> its QuantWeight in `fmt` (`group`: inputs per scale for int4; fp4 uses 32 as
    the release does; both fall back to a smaller group that divides the input dim, see `fitting_group`; fp8 128x128
    blocks). Scales are kept as precise as the format's memory allows: fp32 (int8, fp8) or bf16 (int4, fp4).
    Stacked matrices (the routed experts) go through the quantizer a few at a time, about `chunk` weights: every
    format's scales stay within one matrix, so this is exact, and a layer of V4-Flash's experts (1.6B weights) does not
    need several fp32 copies of itself."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    g = fitting_group(fmt, w.shape[-1], group)
    if g is None:
        raise ValueError(f"{fmt}: no group of {MIN_GROUP} or more inputs divides {w.shape[-1]} inputs")
    if w.dim() > 2 and w.numel() > chunk:
        flat = w.flatten(0, -3)
        step = max(1, chunk // (w.shape[-1] * w.shape[-2]))
        parts = [_quantize(flat[i:i + step], fmt, g) for i in range(0, len(flat), step)]
        return QuantWeight(fmt, torch.cat([p.codes for p in parts]).unflatten(0, w.shape[:-2]),
                           torch.cat([p.scale for p in parts]).unflatten(0, w.shape[:-2]))
    return _quantize(w, fmt, g)


def _quantize(w: torch.Tensor, fmt: str, g: int) -> QuantWeight:
    if fmt == "int8":
        return QuantWeight(fmt, *quant.quant_int8(w))
    if fmt == "int4":
        return QuantWeight(fmt, *quant.quant_int4(w, g))
    if fmt == "fp8":
        return QuantWeight(fmt, *quant.quant_fp8(w, scale_dtype=torch.float32))
    codes, scale = quant.quant_fp4(w, g, scale_dtype=torch.bfloat16)
    return QuantWeight(fmt, codes.view(torch.uint8), scale)
