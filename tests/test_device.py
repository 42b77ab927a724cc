"""Device and dtype resolution, vendor mapping, memory statistics, and the allocator tuning used by entry points:
each decision is driven through the conditions it depends on (on this CPU for real; an accelerator by faking what
`torch.accelerator` reports), so a wrong branch fails."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dsv4 import device as D
from dsv4.device import (
    KINDS,
    MemoryStats,
    accelerator,
    can_compile,
    cpu_bf16_is_fast,
    default_device,
    device_count,
    distributed_backend,
    fastest_dtype,
    has_fused_adamw,
    memory_stats,
    parse_device,
    release_free_memory,
    reset_peak,
    resolve_dtype,
    synchronize,
    tune_cpu_allocator,
    vendor,
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


def fake_accelerator(monkeypatch, device_type: str | None, count: int = 1):
    """Pretend torch.accelerator reports `device_type` (None: no accelerator) with `count` devices."""
    device = None if device_type is None else torch.device(device_type)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: device)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count if device else 0)


def test_default_device_is_the_accelerator_else_the_cpu(monkeypatch):
    assert (accelerator() is None) == (not torch.accelerator.is_available())  # the real machine
    assert default_device() == (accelerator() or torch.device("cpu"))
    for device_type in ("cuda", "xpu", "mps"):
        fake_accelerator(monkeypatch, device_type)
        assert accelerator() == default_device() == torch.device(device_type)
    fake_accelerator(monkeypatch, None)
    assert accelerator() is None and default_device() == torch.device("cpu")


def test_can_compile_needs_a_cpp_compiler_on_cpu(monkeypatch):
    assert can_compile("cuda") is True and can_compile("xpu:0") is True
    assert not any(can_compile(t) for t in ("mps", "npu", "mlu:1", "meta"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert can_compile("cpu") is False
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name if name == "clang++" else None)
    assert can_compile("cpu") is True


def test_fused_adamw_kinds():
    assert has_fused_adamw("cpu") and has_fused_adamw(torch.device("cuda", 1))
    assert has_fused_adamw("xpu")
    assert not any(has_fused_adamw(t) for t in ("mps", "npu:0", "mlu", "meta"))


def test_tune_cpu_allocator_applies_on_glibc():
    import platform

    accepted = tune_cpu_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert accepted is True
    x = torch.randn(1024, 1024)  # large allocations still work afterwards
    torch.testing.assert_close((x @ x).sum(), (x @ x).sum())


@pytest.mark.parametrize("device, name, backend", [
    ("cuda", "NVIDIA CUDA", "nccl"),
    ("cuda:1", "NVIDIA CUDA", "nccl"),
    ("xpu", "Intel XPU", "xccl"),
    ("mps", "Apple MPS", "gloo"),
    ("npu:0", "Huawei Ascend", "hccl"),
    ("mlu", "Cambricon MLU", "cncl"),
    ("cpu", "CPU", "gloo"),
    (torch.device("cpu"), "CPU", "gloo"),
])
def test_each_vendor_maps_to_its_name_and_backend(device, name, backend):
    assert vendor(device) == name and distributed_backend(device) == backend


def test_rocm_is_cuda_by_another_name(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert vendor("cuda:0") == "AMD ROCm" and distributed_backend("cuda") == "nccl"  # RCCL answers to nccl
    assert vendor("cpu") == "CPU"


def test_vendor_and_backend_default_to_the_accelerator(monkeypatch):
    fake_accelerator(monkeypatch, "xpu")
    assert vendor() == "Intel XPU" and distributed_backend() == "xccl"
    fake_accelerator(monkeypatch, None)
    assert vendor() == "CPU" and distributed_backend() == "gloo"


def test_unknown_devices_are_refused():
    for device in ("meta", "tpu", "gpu:0"):
        with pytest.raises(ValueError, match="unknown device"):
            vendor(device)
        with pytest.raises(ValueError, match="unknown device"):
            distributed_backend(device)
    assert set(KINDS) == {"cuda", "xpu", "mps", "npu", "mlu", "cpu"}


def test_parse_device(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert parse_device("xpu") == torch.device("xpu") and parse_device("mps") == torch.device("mps")
    assert parse_device(torch.device("cuda", 2)) == torch.device("cuda", 2)
    fake_accelerator(monkeypatch, "mps")
    assert parse_device("auto") == parse_device(None) == torch.device("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'.*cuda, xpu, mps, npu, mlu, cpu"):
        parse_device("tpu")
    with pytest.raises(ValueError, match="unknown device 'meta'"):
        parse_device(torch.device("meta"))
    for bad in ("cuda:", "cuda:x", "npu:-1"):
        with pytest.raises(ValueError, match="bad device index"):
            parse_device(bad)


@pytest.mark.parametrize("device_type, plugin", [("npu", "torch_npu"), ("mlu", "torch_mlu")])
def test_parse_device_names_the_missing_plugin(device_type, plugin):
    try:
        torch.device(device_type)
    except RuntimeError:
        with pytest.raises(ValueError, match=f"needs the {plugin} package"):
            parse_device(f"{device_type}:0")
    else:
        pytest.skip(f"{plugin} is installed")


def test_out_of_tree_device_parses_once_its_type_is_registered():
    """What torch_npu does on import (rename the PrivateUse1 device type to "npu") makes "npu:1" a device; done in
    a child process because a process can name PrivateUse1 only once."""
    code = ("import torch; torch.utils.rename_privateuse1_backend('npu')\n"
            "from dsv4.device import parse_device, vendor, distributed_backend, has_fused_adamw\n"
            "d = parse_device('npu:1'); print(d, vendor(d), distributed_backend(d), has_fused_adamw(d))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], text=True,
                         capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "npu:1 Huawei Ascend hccl False"


def test_installed_plugins_are_imported_and_broken_ones_skipped(monkeypatch, tmp_path):
    (tmp_path / "torch_mlu.py").write_text("LOADED = True\n")
    (tmp_path / "torch_npu.py").write_text("raise ImportError('no Ascend driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    D._load_plugins.cache_clear()
    try:
        with pytest.warns(UserWarning, match="torch_npu is installed but failed to import.*Huawei Ascend"):
            assert D._load_plugins() == ("torch_mlu",)
        assert sys.modules["torch_mlu"].LOADED
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert D._load_plugins() == ("torch_mlu",)  # imported once per process, not again on every call
    finally:
        sys.modules.pop("torch_mlu", None)
        D._load_plugins.cache_clear()


def test_device_count(monkeypatch):
    fake_accelerator(monkeypatch, None)
    assert device_count() == device_count("cpu") == 1 and device_count("cuda") == 0
    fake_accelerator(monkeypatch, "cuda", count=4)
    assert device_count() == device_count("cuda") == device_count("cuda:3") == 4
    assert device_count("xpu") == 0 and device_count("cpu") == 1


def test_synchronize_waits_on_accelerators_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: calls.append(device))
    fake_accelerator(monkeypatch, None)
    synchronize()
    synchronize("cpu")
    synchronize(torch.device("meta"))
    assert calls == []
    synchronize("cuda:1")
    fake_accelerator(monkeypatch, "xpu")
    synchronize()
    assert calls == [torch.device("cuda", 1), torch.device("xpu")]


@pytest.mark.parametrize("device_type, supported, want", [
    ("cuda", True, torch.bfloat16), ("cuda", False, torch.float32),
    ("xpu", True, torch.bfloat16), ("xpu", False, torch.float32),
])
def test_fastest_dtype_on_accelerators_asks_for_bf16_support(monkeypatch, device_type, supported, want):
    monkeypatch.setattr(getattr(torch, device_type), "is_bf16_supported", lambda *a, **k: supported)
    assert fastest_dtype(f"{device_type}:0") is want and resolve_dtype("auto", device_type) is want


def test_fastest_dtype_follows_the_table(monkeypatch):
    assert fastest_dtype("mps") is torch.float32  # MPS bf16 matmuls are no faster than fp32's
    if not hasattr(torch, "npu"):
        assert fastest_dtype("npu:0") is torch.bfloat16  # no support query without the plugin: trust the table
    fake_accelerator(monkeypatch, "mps")
    assert fastest_dtype() is torch.float32


def test_cpu_memory_stats_and_peak_reset():
    """64 MB of anonymous pages, mapped and touched outside malloc (whose free lists could serve a tensor from memory
    already resident), move the resident set and its peak; unmapped, a reset peak comes back down."""
    import mmap

    before = memory_stats("cpu")
    assert before.allocated > 0 and before.peak >= before.allocated
    assert 0 < before.free <= before.total and before.allocated < before.total
    size = 64 * 2**20
    pages = mmap.mmap(-1, size)
    for i in range(0, size, mmap.PAGESIZE):
        pages[i] = 1
    grown = memory_stats()
    assert grown.allocated >= before.allocated + 48 * 2**20 and grown.peak >= grown.allocated
    pages.close()
    if reset_peak("cpu"):  # Linux
        after = memory_stats("cpu")
        assert after.allocated <= grown.allocated - 48 * 2**20 and after.allocated <= after.peak < grown.peak
    assert "GiB" in str(before)


def test_accelerator_memory_stats_come_from_torch_accelerator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.accelerator, "memory_allocated", lambda d: calls.append(d) or 3 * 2**30)
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda d: 5 * 2**30)
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda d: (70 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: calls.append("empty"))
    assert memory_stats("cuda:1") == MemoryStats(3 * 2**30, 5 * 2**30, 70 * 2**30, 80 * 2**30)
    assert str(memory_stats("cuda:1")) == "allocated 3.00 GiB, peak 5.00 GiB, free 70.00 GiB of 80.00 GiB"
    assert reset_peak("cuda:1") is True and release_free_memory("cuda:1") is True
    assert calls[0] == torch.device("cuda", 1) and calls[-2:] == [("reset", torch.device("cuda", 1)), "empty"]

    def unsupported(d):
        raise RuntimeError("not implemented for this device")

    monkeypatch.setattr(torch.accelerator, "get_memory_info", unsupported)  # e.g. an out-of-tree device
    fake_accelerator(monkeypatch, "mps")
    assert memory_stats() == MemoryStats(3 * 2**30, 5 * 2**30, None, None)
    with pytest.raises(ValueError, match="unknown device"):
        memory_stats("meta")


def test_release_free_memory_on_cpu_trims_the_heap(monkeypatch):
    def no_accelerator():
        raise AssertionError("the CPU has no accelerator cache to empty")

    monkeypatch.setattr(torch.accelerator, "empty_cache", no_accelerator)
    assert isinstance(release_free_memory(), bool) and isinstance(release_free_memory("cpu"), bool)
