"""The product sets of dsv4.kernels.fused: every `Fused` product computes what its plain `Products` twin computes,
`CpuDecode` runs the fused ones only in a compiled step over a few rows (and then really leaves BLAS), and a model
prepared for decoding gives the plain model's logits."""

import string

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import profile

from dsv4.kernels.fused import CpuDecode, Fused, Products, matvec, prepare_decode, use_products
from tests.helpers import random_ids, random_model


@st.composite
def contractions(draw):
    """A random two-operand einsum: letters shared or not, summed or kept, in any order, sizes 1..4."""
    letters = string.ascii_lowercase[: draw(st.integers(1, 6))]
    place = {c: draw(st.sampled_from(["a", "b", "ab"])) for c in letters}
    kept = {c: draw(st.booleans()) for c in letters}
    a_dims = "".join(draw(st.permutations([c for c in letters if "a" in place[c]])))
    b_dims = "".join(draw(st.permutations([c for c in letters if "b" in place[c]])))
    out = "".join(draw(st.permutations([c for c in letters if kept[c]])))
    sizes = {c: draw(st.integers(1, 4)) for c in letters}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    a = torch.randn([sizes[c] for c in a_dims], generator=g)
    b = torch.randn([sizes[c] for c in b_dims], generator=g)
    return f"{a_dims},{b_dims}->{out}", a, b


@settings(max_examples=200, deadline=None)
@given(contractions())
def test_fused_contract_is_einsum(case):
    eq, a, b = case
    torch.testing.assert_close(Fused.contract(eq, a, b), Products.contract(eq, a, b), atol=1e-5, rtol=1e-5)


def test_fused_contract_keeps_the_dtype_and_the_models_equations():
    g = torch.Generator().manual_seed(0)
    cases = [("bnwhd,bnkd->bnwhk", (2, 1, 3, 4, 8), (2, 1, 6, 8)), ("bsht,bsh->bst", (2, 3, 4, 7), (2, 3, 4)),
             ("bsgi,gri->bsgr", (1, 1, 4, 8), (4, 6, 8)), ("bsjk,bsjd->bskd", (2, 1, 4, 4), (2, 1, 4, 8))]
    for eq, sa, sb in cases:
        a, b = torch.randn(sa, generator=g).bfloat16(), torch.randn(sb, generator=g).bfloat16()
        fused = Fused.contract(eq, a, b)
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), torch.einsum(eq, a.float(), b.float()), atol=0.05, rtol=0.02)


def test_matvec_is_linear_with_batched_weights():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g), torch.randn(5, 7, 16, generator=g)  # one weight per row (gathered)
    ref = torch.stack([F.linear(x[i], w[i]) for i in range(5)])
    torch.testing.assert_close(matvec(x, w), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matvec(x[:1], w[0]), F.linear(x[:1], w[0]), atol=1e-5, rtol=1e-5)


def test_every_fused_product_equals_its_plain_twin():
    """linear (1..5 rows, leading dims), grouped_linear, gathered_linear, matmul (the hyper-connections' shapes,
    size-1 dims included), in fp32 and bf16."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        cases = [("linear", rand(2, 3, 24, dtype=dtype), rand(10, 24, dtype=dtype)),
                 ("linear", rand(1, 1, 24, dtype=dtype), rand(10, 24, dtype=dtype)),
                 ("grouped_linear", rand(2, 2, 4, 8, dtype=dtype), rand(4, 6, 8, dtype=dtype)),
                 ("gathered_linear", rand(6, 16, dtype=dtype), rand(6, 5, 16, dtype=dtype)),
                 ("matmul", rand(2, 3, 1, 4), rand(2, 3, 4, 16)),  # collapse: w [B, S, 1, n] @ h [B, S, n, D]
                 ("matmul", rand(2, 3, 4, 4).transpose(-1, -2), rand(2, 3, 4, 16))]  # stream mix: comb^T h
        for name, a, b in cases:
            fused, plain = getattr(Fused, name)(a, b), getattr(Products, name)(a, b)
            assert fused.shape == plain.shape and fused.dtype == plain.dtype, name
            torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol, msg=name)


def test_cpu_decode_is_plain_unless_compiled_over_a_few_rows():
    assert CpuDecode.for_rows(1) is Products  # eager: the fused forms would materialise their products
    picked = {}
    for rows in (1, 4, 5):
        fn = torch.compile(lambda x, rows=rows: x + (1.0 if CpuDecode.for_rows(rows) is Fused else 0.0),
                           dynamic=False, backend="eager")
        picked[rows] = fn(torch.zeros(1)).item()
    assert picked == {1: 1.0, 4: 1.0, 5: 0.0}


def blas_calls(fn, *args) -> int:
    with profile() as prof:
        fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


@torch.no_grad()
def test_compiled_cpu_decode_linear_takes_the_matvec_path_for_a_few_rows_only():
    g = torch.Generator().manual_seed(0)
    w, wg = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(4, 24, 16, generator=g).bfloat16()
    fn = torch.compile(lambda x: CpuDecode.linear(x, w), dynamic=False)
    grouped = torch.compile(lambda x: CpuDecode.grouped_linear(x, wg), dynamic=False)
    for rows in (1, 3, 5):
        x = torch.randn(1, rows, 64, generator=g).bfloat16()
        torch.testing.assert_close(fn(x).float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
        assert (blas_calls(fn, x) == 0) == (rows <= 4)
        xg = x.view(1, rows, 4, 16)
        ref = torch.einsum("bsgi,goi->bsgo", xg.float(), wg.float())
        torch.testing.assert_close(grouped(xg).float(), ref, atol=0.05, rtol=0.02)
        assert (blas_calls(grouped, xg) == 0) == (rows <= 4)
    assert blas_calls(lambda x: CpuDecode.linear(x, w), x[:, :1]) == 1  # eager: always BLAS


@torch.no_grad()
def test_models_with_fused_products_give_the_plain_logits():
    """The whole model (forward and a cached step) through `Fused` products, eager, against the plain model; and
    `prepare_decode` hands every multiplying module the CPU decode set and fuses the projection groups."""
    import copy

    from dsv4.model.cache import KVCache

    model = random_model()
    ids = random_ids(model.args, 2, 21)
    want = model(ids)
    fused = use_products(copy.deepcopy(model), Fused)
    torch.testing.assert_close(fused(ids), want, atol=1e-4, rtol=1e-4)
    cache = KVCache(fused.args, slots=2, max_len=21)
    step = fused.make_step(cache, torch.arange(2), torch.zeros(2, dtype=torch.long), 21)
    torch.testing.assert_close(fused.logits(fused.step(ids, cache, step)), want, atol=1e-4, rtol=1e-4)

    prepared = prepare_decode(copy.deepcopy(model))
    holders = [m for m in prepared.modules() if hasattr(m, "ops")]
    assert len(holders) > 50 and all(m.ops is CpuDecode for m in holders)
    assert prepared.layers[1].attn.x_group.block is not None
    torch.testing.assert_close(prepared(ids), want, atol=1e-5, rtol=1e-5)  # eager: the plain products
