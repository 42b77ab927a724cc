"""The only module that knows device kinds: which device to run on, which compute dtype is fastest there, which
distributed backend joins its processes, how to wait for it and how much memory it holds.

Everything else takes a `torch.device` and a `torch.dtype` from its caller (STYLE: device and dtype flow in), and a
test (tests/test_vendor.py) fails when another module names a vendor's device. The accelerator is whatever
`torch.accelerator` reports; each vendor is one row of `KINDS`:

    NVIDIA CUDA and AMD ROCm   "cuda"  (ROCm builds of PyTorch reuse the CUDA device type; torch.version.hip is set)
    Intel XPU                  "xpu"
    Apple MPS                  "mps"
    Huawei Ascend              "npu"   (out-of-tree: the torch_npu package registers it when imported)
    Cambricon MLU              "mlu"   (out-of-tree: torch_mlu)
    CPU                        "cpu"
"""

import functools
import importlib
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class Kind:
    """What dsv4 needs to know about one device type."""
    type: str              # torch.device(...).type
    name: str              # the vendor, for humans
    plugin: str | None     # the package that registers an out-of-tree device type with torch when imported
    backend: str           # torch.distributed backend for collectives between such devices
    bf16: bool             # bf16 matmuls are fast (on the CPU: measured, see cpu_bf16_is_fast)
    compiles: bool         # torch.compile's default backend (inductor) generates code here (CPU: needs a compiler)
    fused_adamw: bool      # torch.optim.AdamW(fused=True) has kernels here
    int8_weights: bool = False  # torch._weight_int8pack_mm (an int8-weight matmul that reads the codes) runs here
    int4_weights: bool = False  # torch._weight_int4pack_mm_for_cpu (int4 weights in its own layout) runs here


KINDS = {k.type: k for k in (
    Kind("cuda", "NVIDIA CUDA", None, "nccl", bf16=True, compiles=True, fused_adamw=True,  # ROCm: RCCL as nccl
         int8_weights=True),
    Kind("xpu", "Intel XPU", None, "xccl", bf16=True, compiles=True, fused_adamw=True),
    Kind("mps", "Apple MPS", None, "gloo", bf16=False, compiles=False, fused_adamw=False, int8_weights=True),
    Kind("npu", "Huawei Ascend", "torch_npu", "hccl", bf16=True, compiles=False, fused_adamw=False),
    Kind("mlu", "Cambricon MLU", "torch_mlu", "cncl", bf16=True, compiles=False, fused_adamw=False),
    Kind("cpu", "CPU", None, "gloo", bf16=True, compiles=True, fused_adamw=True, int8_weights=True,
         int4_weights=True),
)}


def _type(device: torch.device | str) -> str:
    """The device type of a torch.device or a device string ("npu:0" -> "npu"), without building a torch.device:
    an out-of-tree type such as "npu" is unknown to torch until its plugin is imported."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0].strip().lower()


def kind(device: torch.device | str) -> Kind:
    """The row of KINDS for this device; ValueError for a type dsv4 does not run on (meta, an unknown string)."""
    try:
        return KINDS[_type(device)]
    except KeyError:
        raise ValueError(f"unknown device {str(device)!r}; choose one of auto, {', '.join(KINDS)} "
                         f"(optionally with an index, e.g. {next(iter(KINDS))}:1; ROCm uses cuda)") from None


@functools.lru_cache(maxsize=1)
def _load_plugins() -> tuple[str, ...]:
    """Import the installed out-of-tree device plugins (once), so that torch knows their device types. Returns the
    names of those imported. A plugin that fails to import is reported and skipped: the CPU still works."""
    loaded = []
    for k in KINDS.values():
        if k.plugin is None or importlib.util.find_spec(k.plugin) is None:
            continue
        try:
            importlib.import_module(k.plugin)
            loaded.append(k.plugin)
        except (ImportError, RuntimeError, OSError) as e:
            warnings.warn(f"{k.plugin} is installed but failed to import ({e}); {k.name} devices are unavailable",
                          stacklevel=2)
    return tuple(loaded)


def accelerator() -> torch.device | None:
    """The accelerator this process can use (a device type, no index), or None: torch.accelerator's answer after
    the installed vendor plugins are imported."""
    _load_plugins()
    acc = torch.accelerator.current_accelerator(check_available=True)
    return None if acc is None else torch.device(acc.type)


def default_device() -> torch.device:
    """The accelerator if there is one, else the CPU."""
    return accelerator() or torch.device("cpu")


def parse_device(spec: torch.device | str | None) -> torch.device:
    """A --device value -> torch.device: "auto" or None (the accelerator if any, else the CPU), or a device type
    from KINDS with an optional index ("cpu", "cuda:1", "npu:0", "mlu", "xpu", "mps"). ValueError otherwise."""
    if isinstance(spec, torch.device):
        kind(spec)
        return spec
    if spec is None or spec.strip().lower() in ("", "auto"):
        return default_device()
    text = spec.strip().lower()
    k = kind(text)
    _, colon, index = text.partition(":")
    if colon and not index.isdigit():
        raise ValueError(f"bad device index in {spec!r}: expected e.g. {k.type}:0")
    _load_plugins()
    try:
        return torch.device(text)
    except RuntimeError:
        need = f"the {k.plugin} package" if k.plugin else "a PyTorch build with it"
        raise ValueError(f"device {spec!r} ({k.name}) needs {need}, which this Python lacks") from None


def device_count(device_type: str | None = None) -> int:
    """How many devices of this type the process sees (default: of the accelerator's type); the CPU counts as one."""
    acc = accelerator()
    device_type = _type(device_type) if device_type else (acc.type if acc else "cpu")
    if device_type == "cpu":
        return 1
    return torch.accelerator.device_count() if acc is not None and acc.type == device_type else 0


def vendor(device: torch.device | str | None = None) -> str:
    """A human name for the device's maker and stack (default device: the accelerator if any)."""
    device_type = _type(device) if device is not None else default_device().type
    if device_type == "cuda" and torch.version.hip:
        return "AMD ROCm"
    return kind(device_type).name


def distributed_backend(device: torch.device | str | None = None) -> str:
    """The torch.distributed backend for processes that each own one such device: nccl (CUDA and ROCm), xccl
    (Intel), hccl (Ascend), cncl (Cambricon), gloo (CPU and Apple, which have no collective library)."""
    return kind(device if device is not None else default_device()).backend


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait until the device has finished the work queued on it (timings must). The CPU runs eagerly: no-op."""
    device = torch.device(device) if device is not None else accelerator()
    if device is not None and device.type not in ("cpu", "meta"):
        torch.accelerator.synchronize(device)


def fastest_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where bf16 matmuls are fast (accelerators that support it; CPUs with AMX / avx512_bf16), else fp32.
    fp16 is never chosen on its own: the model's activations overflow it without loss scaling."""
    device_type = _type(device) if device is not None else default_device().type
    k = KINDS.get(device_type)
    if k is None or not k.bf16:
        return torch.float32
    if device_type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    supported = getattr(getattr(torch, device_type, None), "is_bf16_supported", None)  # older GPUs lack bf16
    return torch.bfloat16 if supported is None or supported() else torch.float32


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Measured once per process: is a [512, 512] x [512, 512] matmul clearly faster in bf16 than in fp32?
    CPUs without AMX / avx512_bf16 emulate bf16 and come out slower, so the measurement is the detection."""
    def best_seconds(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(512, 512, generator=g).to(dtype)
        b = torch.randn(512, 512, generator=g).to(dtype)
        a @ b  # warm-up: first call pays for kernel selection
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.bfloat16) < 0.8 * best_seconds(torch.float32)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or their torch spellings) -> torch.dtype; None or 'auto' -> fastest_dtype(device)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return fastest_dtype(device)
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}") from None


GROUP_ROWS = 64


def grouped_rows_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """The multiple to round each expert's rows up to before a grouped GEMM (1: none). On the CPU, bf16 and fp16
    matmuls go to oneDNN, which JIT-compiles a kernel for every new matrix shape and keeps ~1,000 in its cache: the
    routed experts' token counts change every training step, and compiling their kernels anew took ~0.2 s of a
    0.65 s `make run` step (2-core Xeon with AMX). Rounded to 64 rows, the shapes repeat. fp32 goes to MKL, which
    compiles nothing per shape; accelerators have their own grouped kernels."""
    return GROUP_ROWS if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


@dataclass(frozen=True)
class MemoryStats:
    """Bytes; None where the device does not say. On an accelerator: held by tensors now and at the peak since the
    last reset_peak, and the device's free and total memory. On the CPU: the process's resident set now and at its
    peak, and the machine's available and total RAM."""
    allocated: int | None
    peak: int | None
    free: int | None
    total: int | None

    def __str__(self) -> str:
        gib = lambda b: "?" if b is None else f"{b / 2**30:.2f} GiB"
        return f"allocated {gib(self.allocated)}, peak {gib(self.peak)}, free {gib(self.free)} of {gib(self.total)}"


def memory_stats(device: torch.device | str | None = None) -> MemoryStats:
    """What the device's memory holds (default device: the accelerator if any, else the CPU)."""
    device = torch.device(device) if device is not None else default_device()
    kind(device)
    if device.type == "cpu":
        return _cpu_memory()

    def ask(fn):  # an out-of-tree device may not implement every query of torch.accelerator's allocator interface
        try:
            return fn(device)
        except (RuntimeError, NotImplementedError, AttributeError):
            return None

    free_total = ask(torch.accelerator.get_memory_info)
    free, total = free_total if free_total is not None else (None, None)
    return MemoryStats(ask(torch.accelerator.memory_allocated), ask(torch.accelerator.max_memory_allocated),
                       free, total)


def _proc_kb(path: str, field: str) -> int | None:
    """A 'Field:  123 kB' line of a /proc file, in bytes (None off Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sysconf_bytes(pages: str) -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_memory() -> MemoryStats:
    peak = _proc_kb("/proc/self/status", "VmHWM")
    if peak is None:  # macOS and the BSDs: the peak from getrusage (bytes on macOS, KiB elsewhere)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return MemoryStats(allocated=_proc_kb("/proc/self/status", "VmRSS"), peak=peak,
                       free=_proc_kb("/proc/meminfo", "MemAvailable") or _sysconf_bytes("SC_AVPHYS_PAGES"),
                       total=_sysconf_bytes("SC_PHYS_PAGES"))


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Start a new peak for memory_stats(device).peak. On the CPU Linux resets the process's peak resident set when
    "5" is written to /proc/self/clear_refs; returns False where that is impossible (the peak stays as it was)."""
    device = torch.device(device) if device is not None else default_device()
    kind(device)
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every large tensor.

    CPU PyTorch allocates through malloc; by default every tensor over a few MB is a fresh mmap whose pages fault in
    on first touch, and on virtual machines page faults are slow (a forward pass of the `small` model at 2K tokens
    spends ~10% of its time there). Raising the mmap threshold to its maximum (32 MB) and the trim threshold lets
    freed blocks be reused. Process-wide, so only entry points (CLI, benchmarks, trainer) call it, never the model.
    Returns whether glibc accepted the settings (False elsewhere, e.g. macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and mallopt(M_TRIM_THRESHOLD, 2**30)
                and mallopt(M_TOP_PAD, 256 * 2**20))


def release_free_memory(device: torch.device | str = "cpu") -> bool:
    """Hand freed memory back: on an accelerator, the caching allocator's unused blocks (torch.accelerator.
    empty_cache); on the CPU, the pages of freed heap memory (glibc's malloc_trim). A long prefill allocates blocks
    whose sizes drift with the context (compressed entries read, attention blocks); with the heap tuned to keep freed
    memory (`tune_cpu_allocator`) those free blocks fragment and the resident size creeps up by ~10 KB per token.
    Trimming every few thousand tokens keeps it flat at no measurable cost. Returns False where there is no glibc."""
    if torch.device(device).type != "cpu":
        torch.accelerator.empty_cache()
        return True
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def has_fused_adamw(device: torch.device | str) -> bool:
    """torch.optim.AdamW(fused=True) has kernels for this device kind."""
    k = KINDS.get(_type(device))
    return k is not None and k.fused_adamw


def has_int8_weight_kernel(device: torch.device | str) -> bool:
    """torch's int8-weight matmul (`torch._weight_int8pack_mm`) has a kernel for this device kind."""
    k = KINDS.get(_type(device))
    return k is not None and k.int8_weights


def vectorizes_int8(device: torch.device | str) -> bool:
    """Whether a compiled loop that reads int8 codes next to fp32 math runs at full vector width here. On the CPU
    only with AVX512: on AVX2 inductor reads 8 codes at a time beside 8 fp32 lanes, a partial load that left `small`'s
    int8 decode at 0.24x fp32 (bench/results/quant_avx2_loop.json); torch's int8 kernel, 0.34x there
    (quant_avx2.json), is the lesser evil. Accelerators: yes."""
    return _type(device) != "cpu" or _cpu_has_avx512()


@torch.compiler.assume_constant_result  # a constant for a compiled step (the query itself is not traceable)
def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def has_int4_weight_kernel(device: torch.device | str) -> bool:
    """torch's int4-weight matmul for this device kind exists (`torch._weight_int4pack_mm_for_cpu`: the CPU's)."""
    k = KINDS.get(_type(device))
    return k is not None and k.int4_weights


def can_compile(device: torch.device | str) -> bool:
    """torch.compile's default backend (inductor) can generate code here: Triton on CUDA, ROCm and Intel GPUs, C++
    on the CPU (if a compiler is installed)."""
    import shutil

    k = KINDS.get(_type(device))
    if k is None or not k.compiles:
        return False
    return k.type != "cpu" or any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
