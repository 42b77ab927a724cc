"""The only module that knows device kinds: which device to run on and which compute dtype is fastest there.

Everything else takes a `torch.device` and a `torch.dtype` from its caller (STYLE: device and dtype flow in).
"""

import functools
import time

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def default_device() -> torch.device:
    """The accelerator if there is one (CUDA, then Apple MPS), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fastest_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where bf16 matmuls are fast (CUDA with bf16 support; CPUs with AMX / avx512_bf16), else fp32.
    fp16 is never chosen on its own: the model's activations overflow it without loss scaling."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return torch.float32


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


def release_free_memory() -> bool:
    """Hand the pages of freed heap memory back to the OS (glibc's malloc_trim). A long prefill allocates blocks whose
    sizes drift with the context (compressed entries read, attention blocks); with the heap tuned to keep freed memory
    (`tune_cpu_allocator`) those free blocks fragment and the resident size creeps up by ~10 KB per token. Trimming
    every few thousand tokens keeps it flat at no measurable cost. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def has_fused_adamw(device: torch.device | str) -> bool:
    """torch.optim.AdamW(fused=True) has kernels for this device kind."""
    return torch.device(device).type in ("cpu", "cuda")


def can_compile(device: torch.device | str) -> bool:
    """torch.compile's default backend (inductor) can generate code here: Triton on CUDA, C++ on the CPU."""
    import shutil

    kind = torch.device(device).type
    if kind == "cuda":
        return True
    return kind == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
