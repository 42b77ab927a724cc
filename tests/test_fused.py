"""The decode-step products of dsv4.kernels.fused compute what the plain products compute, and the compiled one-row
path really leaves BLAS."""

import string

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.profiler import profile

from dsv4.kernels.fused import contract, grouped_linear, linear, matvec


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
    torch.testing.assert_close(contract(eq, a, b, fuse=True), torch.einsum(eq, a, b), atol=1e-5, rtol=1e-5)


def test_fused_contract_keeps_the_dtype_and_the_models_equations():
    g = torch.Generator().manual_seed(0)
    cases = [("bnwhd,bnkd->bnwhk", (2, 1, 3, 4, 8), (2, 1, 6, 8)), ("bsht,bsh->bst", (2, 3, 4, 7), (2, 3, 4)),
             ("bsgi,gri->bsgr", (1, 1, 4, 8), (4, 6, 8)), ("bsjk,bsjd->bskd", (2, 1, 4, 4), (2, 1, 4, 8))]
    for eq, sa, sb in cases:
        a, b = torch.randn(sa, generator=g).bfloat16(), torch.randn(sb, generator=g).bfloat16()
        fused = contract(eq, a, b, fuse=True)
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), torch.einsum(eq, a.float(), b.float()), atol=0.05, rtol=0.02)


def test_matvec_is_linear_with_batched_weights():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 16, generator=g), torch.randn(5, 7, 16, generator=g)  # one weight per row (gathered)
    ref = torch.stack([F.linear(x[i], w[i]) for i in range(5)])
    torch.testing.assert_close(matvec(x, w), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matvec(x[:1], w[0]), F.linear(x[:1], w[0]), atol=1e-5, rtol=1e-5)


def blas_calls(fn, *args) -> int:
    with profile() as prof:
        fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


@torch.no_grad()
def test_compiled_linear_takes_the_matvec_path_for_a_few_rows_only():
    g = torch.Generator().manual_seed(0)
    w, wg = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(4, 24, 16, generator=g).bfloat16()
    fn = torch.compile(lambda x: linear(x, w), dynamic=False)
    grouped = torch.compile(lambda x: grouped_linear(x, wg), dynamic=False)
    for rows in (1, 3, 5):
        x = torch.randn(1, rows, 64, generator=g).bfloat16()
        torch.testing.assert_close(fn(x).float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
        assert (blas_calls(fn, x) == 0) == (rows <= 4)
        xg = x.view(1, rows, 4, 16)
        ref = torch.einsum("bsgi,goi->bsgo", xg.float(), wg.float())
        torch.testing.assert_close(grouped(xg).float(), ref, atol=0.05, rtol=0.02)
        assert (blas_calls(grouped, xg) == 0) == (rows <= 4)
    assert blas_calls(lambda x: linear(x, w), x[:, :1]) == 1  # eager: always BLAS
