"""Products for decoding: one-row products as bandwidth-bound loops, small contractions fused into their neighbours,
and the linear layers that read the same input run as one matrix product.

A compiled decode step of one sequence multiplies one row by each of ~60 weight matrices and runs ~50 tiny attention
contractions. On CPU, BLAS's bf16 matrix-vector product streams a weight at ~20 GB/s plus a fixed ~15 us per call;
written as a multiply-and-sum (`matvec`), inductor emits one vectorised loop that streams it about twice as fast, and
`contract` turns the tiny batched matmuls into loops that fuse with the soft-max around them. Together they took a
`small` decode step from 6.2 to 3.3 ms (bench/decode.py). Both apply only under torch.compile on CPU and for a few
rows (`decoding`; eager would materialise the products, and at batch 16 BLAS is as fast); everything else, training
included, runs the plain products. tests/test_fused.py compares the two.

The layers that share an input (the attention's query, key, compressor and indexer projections; the shared expert's
gate and up) are grouped (`LinearGroup`): `fuse()` re-homes the group's weights into one contiguous [sum of outputs,
in] block, each weight becoming a view of its rows: no second copy, and in-place updates of the weights stay visible.
Fuse after the model has its final device and dtype (moving it re-allocates the weights).
"""

import torch
import torch.nn.functional as F
from torch import nn


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[..., in] x weight [..., out, in] -> [..., out] as an fp32 multiply-and-sum (what F.linear computes; the
    weight may carry batch dims, e.g. gathered experts)."""
    return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)


def compiled_on_cpu(x: torch.Tensor) -> bool:
    """Is `x` being traced by torch.compile for a CPU (where `matvec` beats BLAS for a few rows)?"""
    return x.device.type == "cpu" and torch.compiler.is_compiling()


def decoding(x: torch.Tensor, rows: int) -> bool:
    """Should `contract` fuse: a compiled step on CPU over a few `rows` (batch x positions)?"""
    return compiled_on_cpu(x) and rows <= 4


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight); compiled on CPU for a few rows, one `matvec` per row. Inductor fuses those into one loop
    that reads each weight row once for all of them (a broadcast [rows, out, in] product would re-read the weight per
    row), so 2-4 rows cost about what one does: the width-2 verify step of speculation, small batches."""
    return _per_row(x, weight, 1, F.linear)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., G, in] through one weight per group, weight [G, out, in] -> [..., G, out]; per row as `linear`."""
    return _per_row(x, weight, 2, lambda x, w: torch.einsum("...gi,goi->...go", x, w))


def _per_row(x: torch.Tensor, weight: torch.Tensor, row_dims: int, plain) -> torch.Tensor:
    lead = x.shape[:-row_dims]
    rows = lead.numel()
    if not decoding(x, rows):
        return plain(x, weight)
    # a Python loop over at most 4 rows, unrolled when traced: the compiled graph has one fused loop for all
    out = torch.stack([matvec(row, weight) for row in x.reshape(rows, *x.shape[-row_dims:]).unbind(0)])
    return out.view(*lead, *out.shape[1:])


def contract(eq: str, a: torch.Tensor, b: torch.Tensor, fuse: bool = False) -> torch.Tensor:
    """torch.einsum(eq, a, b) for two operands ("ab,bc->ac" form, no repeated letter within an operand). With `fuse`
    (a compiled decode step: see `decoding`) it is a broadcast multiply-and-sum in fp32, which inductor fuses with its
    neighbours into one loop instead of calling a tiny batched matmul."""
    if not fuse:
        return torch.einsum(eq, a, b)
    inputs, out = eq.split("->")
    letters = out + "".join(c for c in dict.fromkeys(inputs.replace(",", "")) if c not in out)  # output, then summed

    def spread(x: torch.Tensor, dims: str) -> torch.Tensor:  # x with one dim per letter, size 1 where it has none
        order = sorted(range(len(dims)), key=lambda i: letters.index(dims[i]))
        x = x.float().permute(order)
        sizes = dict(zip((dims[i] for i in order), x.shape))
        return x.reshape([sizes.get(c, 1) for c in letters])

    a_dims, b_dims = inputs.split(",")
    y = spread(a, a_dims) * spread(b, b_dims)
    if len(letters) > len(out):
        y = y.sum(dim=tuple(range(len(out), len(letters))))
    return y.to(torch.promote_types(a.dtype, b.dtype))


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose product is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class LinearGroup:
    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self.block: torch.Tensor | None = None

    @torch.no_grad()
    def fuse(self):
        weights = [m.weight for m in self.linears]
        if any(w.device.type == "meta" or w.dtype != weights[0].dtype for w in weights):
            return  # nothing to gain on meta; mixed dtypes stay separate
        block = torch.cat(weights)
        at = 0
        for m, n in zip(self.linears, self.sizes):
            m.weight.data = block[at: at + n]
            at += n
        self.block = block

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[..., in] -> each layer's output, in order."""
        if self.block is None:
            return [m(x) for m in self.linears]
        return list(linear(x, self.block).split(self.sizes, dim=-1))


def fuse_linear_groups(model: nn.Module) -> nn.Module:
    """Fuse every LinearGroup a module of `model` holds. Returns the model."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearGroup):
                value.fuse()
    return model
