"""A weight kept quantized in memory, and its products: what a quantized layer hands its product set instead of a
dense [out, in] matrix.

    fmt    codes                                   scale                                  W[o, i] =
    int8   int8 [.., out, in]                      fp32 [.., out]                         q[o, i] s[o]
    int4   uint8 [.., out, in/2] (low nibble even) bf16 [.., out, in/g]                   q[o, i] s[o, i // g]
    fp8    float8_e4m3fn [.., out, in]             fp32/ue8m0 [.., out/128, in/128]       q[o, i] s[o//128, i//128]
    fp4    uint8 [.., out, in/2] e2m1 codes        bf16/ue8m0 [.., out, in/32]            e2m1(q[o, i]) s[o, i // 32]
(dsv4.kernels.quant has the formats and their quantizers; `..` are leading dims, e.g. the routed experts.)

Three ways to multiply, each tested against `dequantize` + F.linear (tests/test_qweight.py):
    linear(x)     eager, any rows. int8 goes to torch's int8-weight kernel (`torch._weight_int8pack_mm`: it reads
                  the codes and scales as they are, on the CPU and accelerators alike); the other formats decode the
                  matrix into x's dtype for one F.linear (prefill: the matrix is read once for many rows).
    matvec(x)     the multiply-and-sum of a compiled decode step (dsv4.kernels.fused.Fused): the codes are decoded
                  inside the loop that sums, so a step streams 1 byte (int8, fp8) or half a byte (int4, fp4) per
                  weight instead of bf16's 2: decoding at batch 1 reads every active weight once, so bytes are time.
    dequantize()  the dense matrix, for everything else (grouped expert GEMMs in prefill, batched matmuls).
`qw[idx]` selects along the leading dims without decoding (the chosen experts of a decode step).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.kernels import quant

FORMATS = ("int8", "int4", "fp8", "fp4")
PACKED_FORMATS = ("int4", "fp4")  # two codes a byte along the input dim


@dataclass(frozen=True)
class QuantWeight:
    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The logical [.., out, in] shape."""
        s = self.codes.shape
        return torch.Size((*s[:-1], 2 * s[-1])) if self.fmt in PACKED_FORMATS else s

    @property
    def group(self) -> int:
        """Inputs per scale along the input dim (int8: the whole row)."""
        if self.fmt == "fp8":
            return quant.FP8_BLOCK[1]
        return self.shape[-1] // (1 if self.fmt == "int8" else self.scale.shape[-1])

    def __getitem__(self, idx) -> "QuantWeight":
        """Select along leading dims (codes and scales alike), e.g. `experts_w13[chosen]`."""
        if self.fmt == "fp8":
            raise NotImplementedError("fp8 blocks span 128 rows; select after dequantize()")
        return QuantWeight(self.fmt, self.codes[idx], self.scale[idx])

    def split_rows(self, groups: int) -> "QuantWeight":
        """[.., G*R, in] -> [.., G, R, in] (a block-diagonal projection's groups)."""
        if self.fmt == "fp8":
            raise NotImplementedError("fp8 blocks span 128 rows; split after dequantize()")
        return QuantWeight(self.fmt, self.codes.unflatten(-2, (groups, -1)),
                           self.scale.unflatten(-2 if self.fmt != "int8" else -1, (groups, -1)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt == "int8":
            w = quant.dequant_int8(self.codes, self.scale)
        elif self.fmt == "int4":
            w = quant.dequant_int4(self.codes, self.scale)
        elif self.fmt == "fp8":
            w = quant.dequant_fp8(self.codes, self.scale)
        elif self.fmt == "fp4":
            w = quant.dequant_fp4(self.codes, self.scale, self.group)
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}; choose one of {FORMATS}")
        return w.to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out] in x's dtype (the eager product; see the module docstring)."""
        if self.fmt == "int8" and self.codes.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                and x.device.type != "meta":
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.codes,
                                          self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize(x.dtype))

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] x [.., out, in] -> [..., out] fp32 as a multiply-and-sum with the codes decoded in the loop (the
        leading dims broadcast as in dsv4.kernels.fused.matvec). The per-row / per-group scale is applied once per
        row / group, after its sum."""
        x = x.unsqueeze(-2).float()  # [..., 1, in]
        if self.fmt == "int8":
            return (x * self.codes.float()).sum(-1) * self.scale.float()
        if self.fmt == "fp8":
            return (x * self.dequantize()).sum(-1)
        g = self.group  # x [..., 1, G, g/2, 2] against the even / odd codes of each byte [.., out, G, g/2]
        xe, xo = x.unflatten(-1, (-1, g // 2, 2)).unbind(-1)
        b = self.codes.view(torch.uint8).unflatten(-1, (-1, g // 2)).to(torch.int32)
        lo, hi = b & 0xF, b >> 4
        if self.fmt == "int4":
            lo, hi = (lo - ((lo & 0x8) << 1)).float(), (hi - ((hi & 0x8) << 1)).float()
        else:
            table = torch.tensor(quant.E2M1_VALUES, dtype=torch.float32, device=b.device)
            lo, hi = table[lo], table[hi]
        return ((xe * lo + xo * hi).sum(-1) * self.scale.float()).sum(-1)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def quantize(w: torch.Tensor, fmt: str, group: int = quant.INT4_GROUP) -> QuantWeight:
    """A dense [.., out, in] weight -> its QuantWeight in `fmt` (`group`: inputs per scale for int4; fp4 uses 32 as
    the release does, fp8 128x128 blocks). Scales are kept as precise as the format's memory allows: fp32 (int8, fp8)
    or bf16 (int4, fp4)."""
    if fmt == "int8":
        return QuantWeight(fmt, *quant.quant_int8(w))
    if fmt == "int4":
        return QuantWeight(fmt, *quant.quant_int4(w, group))
    if fmt == "fp8":
        return QuantWeight(fmt, *quant.quant_fp8(w, scale_dtype=torch.float32))
    if fmt == "fp4":
        codes, scale = quant.quant_fp4(w, scale_dtype=torch.bfloat16)
        return QuantWeight(fmt, codes.view(torch.uint8), scale)
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
