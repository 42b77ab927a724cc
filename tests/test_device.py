"""Device and dtype resolution, and the allocator tuning used by entry points: each decision is driven through the
conditions it depends on (monkeypatched), so a wrong branch fails."""

import shutil

import pytest
import torch

from dsv4 import device as D
from dsv4.device import (
    can_compile,
    cpu_bf16_is_fast,
    default_device,
    fastest_dtype,
    has_fused_adamw,
    resolve_dtype,
    tune_cpu_allocator,
)


def test_resolve_dtype_names_and_errors():
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("bf16_fast, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_fastest_dtype_on_cpu_follows_the_measurement(monkeypatch, bf16_fast, want):
    monkeypatch.setattr(D, "cpu_bf16_is_fast", lambda: bf16_fast)
    assert fastest_dtype("cpu") is want
    assert resolve_dtype("auto", "cpu") is want and resolve_dtype(None, "cpu") is want
    assert fastest_dtype("meta") is torch.float32  # no measurement for other kinds


def test_cpu_bf16_measurement_compares_the_two_matmuls(monkeypatch):
    """bf16 is chosen only when its matmul is clearly (> 1.25x) faster than fp32's: fake clocks drive the choice."""
    def with_times(bf16_s: float, fp32_s: float) -> bool:
        clock = {"t": 0.0}
        real_matmul = torch.Tensor.__matmul__

        def timed_matmul(a, b):
            clock["t"] += bf16_s if a.dtype == torch.bfloat16 else fp32_s
            return real_matmul(a, b)

        monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
        monkeypatch.setattr(D.time, "perf_counter", lambda: clock["t"])
        cpu_bf16_is_fast.cache_clear()
        try:
            return cpu_bf16_is_fast()
        finally:
            monkeypatch.undo()
            cpu_bf16_is_fast.cache_clear()

    assert with_times(1.0, 4.0) is True
    assert with_times(1.0, 1.1) is False  # within noise: fp32
    assert with_times(3.0, 1.0) is False  # emulated bf16 (AVX2-only CPUs)


def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert default_device().type == "cpu"


def test_can_compile_needs_a_cpp_compiler_on_cpu(monkeypatch):
    assert can_compile("cuda") is True
    assert can_compile("mps") is False
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert can_compile("cpu") is False
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name if name == "clang++" else None)
    assert can_compile("cpu") is True


def test_fused_adamw_kinds():
    assert has_fused_adamw("cpu") and has_fused_adamw(torch.device("cuda", 1))
    assert not has_fused_adamw("mps") and not has_fused_adamw("meta")


def test_tune_cpu_allocator_applies_on_glibc():
    import platform

    accepted = tune_cpu_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert accepted is True
    x = torch.randn(1024, 1024)  # large allocations still work afterwards
    torch.testing.assert_close((x @ x).sum(), (x @ x).sum())
