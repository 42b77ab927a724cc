"""The model's products, as sets chosen once when a model is prepared: plain torch, or fused for CPU decoding. Also the
linear layers that read the same input, run as one matrix product.

Every module that multiplies holds `ops`, a set of products: `Products` (torch's own kernels: the model's reference,
what training and GPUs run) unless the model was prepared otherwise. `prepare_decode` gives a CPU model `CpuDecode`:

    linear(x, W)            = x W^T                       Fused: one multiply-and-sum  sum_i x_i W_oi  per row
    grouped_linear(x, W)    = x_g W_g^T per group g        Fused: the same, per row and group
    gathered_linear(x, W)   = x_a W_a^T, each row its own  Fused: the same; W_a read in place (e.g. chosen experts)
    matmul(a, b), contract(eq, a, b)                       Fused: a broadcast multiply and a sum, in fp32

A compiled decode step of one sequence multiplies one row by each of ~60 weight matrices and runs ~50 tiny attention
contractions. On CPU, BLAS's bf16 matrix-vector product streams a weight at ~20 GB/s plus a fixed ~15 us per call;
written as a multiply-and-sum, inductor emits one vectorised loop that streams it about twice as fast, and the tiny
batched matmuls become loops that fuse with the soft-max around them. Together they took a `small` decode step from
6.2 to 3.3 ms (bench/decode.py). So `CpuDecode` runs `Fused` under torch.compile for at most ROWS rows (batch x
positions) and the plain products otherwise (eager would materialise the products; at batch 16 BLAS is as fast).
tests/test_fused.py compares every `Fused` product with its `Products` twin.

The layers that share an input (the attention's query, key, compressor and indexer projections; the shared expert's
gate and up) are grouped (`LinearGroup`): `fuse()` re-homes the group's weights into one contiguous [sum of outputs,
in] block, each weight becoming a view of its rows: no second copy, and in-place updates of the weights stay visible.
Fuse after the model has its final device and dtype (moving it re-allocates the weights).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels.qweight import QuantWeight

Weight = torch.Tensor | QuantWeight  # a product's weight: dense, or kept quantized (dsv4.kernels.qweight)


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense matrix a torch kernel takes (a quantized one decoded into `dtype`)."""
    return weight.dequantize(dtype) if isinstance(weight, QuantWeight) else weight


class Products:
    """The plain products: torch's own kernels, the reference every other set is tested against."""

    @staticmethod
    def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """[..., in] x weight [out, in] -> [..., out]"""
        return weight.linear(x) if isinstance(weight, QuantWeight) else F.linear(x, weight)

    @staticmethod
    def grouped_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """x [..., G, in] through one weight per group, weight [G, out, in] -> [..., G, out]"""
        return torch.einsum("...gi,goi->...go", x, dense(weight, x.dtype))

    @staticmethod
    def gathered_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """Each row through its own weight: x [A, in], weight [A, out, in] -> [A, out]"""
        if isinstance(weight, QuantWeight):
            return weight.gathered(x)
        return torch.bmm(x[:, None], weight.transpose(1, 2))[:, 0]

    @staticmethod
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched a [..., m, k] @ b [..., k, n] -> [..., m, n]"""
        return a @ b

    @staticmethod
    def contract(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """torch.einsum(eq, a, b) for two operands ("ab,bc->ac" form, no repeated letter within an operand)."""
        return torch.einsum(eq, a, b)

    @classmethod
    def for_rows(cls, rows: int) -> type["Products"]:
        """The set to run a computation over `rows` rows (batch x positions) with: this one."""
        return cls


def matvec(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """[..., in] x weight [..., out, in] -> [..., out] as an fp32 multiply-and-sum (what F.linear computes; the
    weight may carry batch dims, e.g. gathered experts; a quantized one is decoded inside the sum)."""
    if isinstance(weight, QuantWeight):
        return weight.matvec(x).to(x.dtype)
    return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)


def _per_row(x: torch.Tensor, weight: torch.Tensor, row_dims: int) -> torch.Tensor:
    """One `matvec` per row (a row: x's last `row_dims` dims). A Python loop, unrolled when traced: inductor fuses
    the rows into one loop that reads each weight row once for all of them (a broadcast [rows, out, in] product would
    re-read the weight per row), so 2-4 rows cost about what one does: the width-2 verify step of speculation, small
    batches."""
    lead = x.shape[:-row_dims]
    rows = lead.numel()
    out = torch.stack([matvec(row, weight) for row in x.reshape(rows, *x.shape[-row_dims:]).unbind(0)])
    return out.view(*lead, *out.shape[1:])


def _multiply_and_sum(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.einsum(eq, a, b) as a broadcast multiply-and-sum in fp32, in a's and b's promoted dtype."""
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


class Fused(Products):
    """The multiply-and-sum forms, unconditionally: what a compiled CPU decode step runs for a few rows (`CpuDecode`
    decides when). Each is a loop inductor vectorises and fuses with its neighbours; eager, it materialises the
    products (fine for tests, slow otherwise)."""

    @staticmethod
    def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        if isinstance(weight, QuantWeight) and weight.kernel_over_loop(x):
            return weight.linear(x)
        return _per_row(x, weight, 1)

    @staticmethod
    def grouped_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        return _per_row(x, weight, 2)

    @staticmethod
    def gathered_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        if isinstance(weight, QuantWeight) and weight.kernel_over_loop(x):
            return weight.gathered(x)
        return matvec(x, weight)

    @staticmethod
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        batch = "abcdefgh"[: a.dim() - 2]  # a and b have the same number of dims (size 1 broadcasts)
        return _multiply_and_sum(f"{batch}xy,{batch}yz->{batch}xz", a, b)

    @staticmethod
    def contract(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _multiply_and_sum(eq, a, b)


class CpuDecode(Products):
    """A CPU model prepared for decoding: `Fused` products for a compiled step over at most ROWS rows, plain ones
    otherwise (eager steps, prefill chunks, larger batches). `linear`, `grouped_linear` and `matmul` count their rows
    (the leading dims); a computation of several contractions picks its set once with `for_rows` (`contract` alone
    has no row count: called directly, it is the plain one). The chosen experts of a decode step are fewer than the
    experts by construction, so `gathered_linear` is fused whenever compiled."""
    ROWS = 4

    @classmethod
    def for_rows(cls, rows: int) -> type[Products]:
        return Fused if torch.compiler.is_compiling() and rows <= cls.ROWS else Products

    @classmethod
    def linear(cls, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return cls.for_rows(x.shape[:-1].numel()).linear(x, weight)

    @classmethod
    def grouped_linear(cls, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return cls.for_rows(x.shape[:-2].numel()).grouped_linear(x, weight)

    @classmethod
    def matmul(cls, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cls.for_rows(a.shape[:-2].numel()).matmul(a, b)

    @staticmethod
    def gathered_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (Fused if torch.compiler.is_compiling() else Products).gathered_linear(x, weight)


def use_products(model: nn.Module, ops: type[Products]) -> nn.Module:
    """Give every module of `model` that multiplies (each has an `ops` attribute) the product set `ops`. Returns the
    model."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return model


def prepare_decode(model: nn.Module) -> nn.Module:
    """Ready a model for the inference engine, once: the linear groups fused and, on a CPU, the decode products
    (`CpuDecode`). Call after the model has its final device and dtype. A placed model (dsv4.weights.placement)
    decides module by module: routed experts kept in CPU memory get the CPU's products, the rest their device's.
    Returns the model."""
    for module in model.modules():  # quantized weights as torch's kernels take them, before fusing
        prepare = getattr(module, "prepare_kernels", None)
        if prepare is not None and _on_cpu(module, model):
            prepare()
    fuse_linear_groups(model)
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = CpuDecode if _on_cpu(module, model) else Products
    return model


def _on_cpu(module: nn.Module, model: nn.Module) -> bool:
    """Whether `module` lives in CPU memory (its own first tensor; one without tensors goes with the model)."""
    tensor = next(module.parameters(recurse=False), None)
    tensor = tensor if tensor is not None else next(module.buffers(recurse=False), None)
    return (tensor if tensor is not None else next(model.parameters())).device.type == "cpu"


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose product comes from its product set `ops`."""
    ops: type[Products] = Products

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in."""
        return self.weight.dtype

    def matrix(self) -> Weight:
        """What the product set multiplies by: the weight (a quantized layer's is a QuantWeight)."""
        return self.weight

    def grouped(self, groups: int) -> Weight:
        """The weight as `groups` stacked blocks [groups, out / groups, in] (a block-diagonal projection)."""
        return self.weight.view(groups, -1, self.weight.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.linear(x, self.matrix())
        return y if self.bias is None else y + self.bias


class QuantLinear(Linear):
    """A Linear whose weight stays quantized in memory (dsv4.kernels.qweight): buffers `weight` (the codes) and
    `scale`, the release's checkpoint names for a quantized weight. `dtype` is the compute dtype of its inputs and
    outputs. Built from a Linear by `from_linear` (on `meta`: the empty buffers a quantized checkpoint fills)."""

    def __init__(self, qw: QuantWeight, dtype: torch.dtype, bias: nn.Parameter | None = None):
        nn.Module.__init__(self)
        self.fmt, self.compute_dtype, self.kernel_layout, self.prepared = qw.fmt, dtype, False, False
        self.out_features, self.in_features = qw.shape[-2], qw.shape[-1]
        self.register_buffer("weight", qw.codes)
        self.register_buffer("scale", qw.scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: Linear, fmt: str, group: int) -> "QuantLinear":
        from dsv4.kernels.qweight import quantize

        with torch.no_grad():
            q = cls(quantize(linear.weight.detach(), fmt, group), linear.weight.dtype, linear.bias)
        q.ops = linear.ops
        return q

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def matrix(self) -> QuantWeight:
        return QuantWeight(self.fmt, self.weight, self.scale, kernel=self.kernel_layout)

    @torch.no_grad()
    def prepare_kernels(self) -> None:
        """On the CPU, the weight as torch's kernels take it (an inference-time step of prepare_decode; a model so
        prepared is not saved): int8's scales in the compute dtype (the kernel wants them in the activations'; cast
        once, not every product), int4's codes re-laid for torch's int4 kernel (same bytes; QuantWeight.to_kernel)."""
        if self.prepared:
            return
        if self.fmt == "int8":
            self.scale = self.scale.to(self.dtype)
        qw = self.matrix().to_kernel()
        if qw.kernel:
            self.weight, self.scale, self.kernel_layout = qw.codes, qw.scale.to(self.dtype), True
        self.prepared = True

    def grouped(self, groups: int) -> Weight:
        qw = self.matrix()
        if not qw.splits_rows(groups):  # fp8 groups that are not whole 128-row blocks: decode
            return qw.dequantize(self.dtype).unflatten(0, (groups, -1))
        return qw.split_rows(groups)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class LinearGroup:
    def __init__(self, *linears: Linear):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self.block: torch.Tensor | None = None

    @torch.no_grad()
    def fuse(self):
        """Quantized layers fuse too when they share a format and group (their codes and scales are stacked);
        fp8's 128-row blocks stack only when every layer's rows are whole blocks."""
        weights = [m.matrix() for m in self.linears]
        first = weights[0]
        def on_meta(w: Weight) -> bool:
            return (w.codes if isinstance(w, QuantWeight) else w).device.type == "meta"

        if any(type(w) is not type(first) or on_meta(w) for w in weights):
            return  # nothing to gain on meta; dense and quantized layers stay separate
        if isinstance(first, QuantWeight):
            if any(w.fmt != first.fmt or w.group != first.group or w.scale.dtype != first.scale.dtype
                   or w.kernel != first.kernel for w in weights) or (
                    first.fmt == "fp8" and any(n % 128 for n in self.sizes)):
                return
            # the kernel layout keeps its (scale, zero) pairs [G, out, 2]: those stack along dim 1
            parts = [("weight", [w.codes for w in weights], 0),
                     ("scale", [w.scale for w in weights], 1 if first.kernel else 0)]
        elif any(w.dtype != first.dtype for w in weights):
            return  # mixed dtypes stay separate
        else:
            parts = [("weight", weights, 0)]
        blocks = []
        for name, tensors, dim in parts:
            block = torch.cat(tensors, dim)
            at = 0
            for m, t in zip(self.linears, tensors):
                getattr(m, name).data = block.narrow(dim, at, t.shape[dim])
                at += t.shape[dim]
            blocks.append(block)
        self.block = blocks[0] if len(blocks) == 1 else QuantWeight(first.fmt, *blocks, kernel=first.kernel)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[..., in] -> each layer's output, in order (fused: one product, with the layers' product set)."""
        if self.block is None:
            return [m(x) for m in self.linears]
        return list(self.linears[0].ops.linear(x, self.block).split(self.sizes, dim=-1))


def fuse_linear_groups(model: nn.Module) -> nn.Module:
    """Fuse every LinearGroup a module of `model` holds. Returns the model."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearGroup):
                value.fuse()
    return model
