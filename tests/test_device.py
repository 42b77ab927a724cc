"""Device and dtype resolution, and the allocator tuning used by entry points."""

import pytest
import torch

from dsv4.device import default_device, fastest_dtype, resolve_dtype, tune_cpu_allocator


def test_resolve_dtype_names_and_errors():
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    assert resolve_dtype("auto", "cpu") is fastest_dtype("cpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_fastest_dtype_is_a_float_type_and_stable():
    dt = fastest_dtype("cpu")
    assert dt in (torch.float32, torch.bfloat16)
    assert fastest_dtype("cpu") is dt  # measured once per process
    assert fastest_dtype("meta") is torch.float32


def test_default_device_is_usable():
    dev = default_device()
    assert torch.zeros(2, device=dev).device.type == dev.type


def test_tune_cpu_allocator_applies_on_glibc():
    import platform

    accepted = tune_cpu_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert accepted is True
    x = torch.randn(1024, 1024)  # large allocations still work afterwards
    torch.testing.assert_close((x @ x).sum(), (x @ x).sum())
