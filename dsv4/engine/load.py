"""A checkpoint directory -> an engine over it, as `dsv4 generate`, `dsv4 chat` and `dsv4 serve` open one.

    model, tok = load_model("runs/small/final", device="cpu", dtype="fp32")
    model, tok = load_model("runs/small/final", device_map="auto", max_len=8192, max_batch=8)  # placed (issue 23)
    engine = load_engine(model, tok, max_len=8192, max_batch=8, compile=True)

A device map (dsv4.weights.placement) puts parts of the model on different devices, e.g. routed experts in host RAM
computing on the CPU and everything else on the accelerator; "auto" asks dsv4.weights.plan for this machine's, in the
formats the loader keeps in memory: a `dsv4 quantize`d checkpoint's format; the release's own FP8 / FP4 (a placed
model keeps them packed, dsv4.weights.packed: V4-Flash is ~160 GB so and ~570 GB decoded); else the compute dtype.
"""

import json
import os
import sys

import torch

from dsv4.device import can_compile, default_device, resolve_dtype
from dsv4.engine.engine import Engine
from dsv4.weights.checkpoint import load_checkpoint, read_config
from dsv4.weights.info import tokens
from dsv4.weights.placement import DeviceMap, main_device, resolve_device
from dsv4.weights.plan import CACHE_DTYPES, Formats, Hardware, Plan, gb, holds, local_memory, plan

AUTO = "auto"


def load_model(ckpt: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
               device_map=None, max_len: int | None = None, max_batch: int = 1):
    """The checkpoint's (model in eval mode, tokenizer) on `device` (default: the accelerator if any) in `dtype`
    ("auto": the fastest that device has; with a device map, the fastest its main device has).
    device_map instead of a device: "auto" (the placement dsv4.weights.plan finds for this machine for `max_batch`
    sequences of `max_len` tokens, None: the model's context; summarised on stderr; DoesNotFit, a ValueError, when
    nothing fits), or a map: JSON text, a JSON file, a `dsv4 plan --json` report (DeviceMap.parse). The checkpoint
    streams straight into the placement, which the model keeps as `model.placement`."""
    if device_map is None:
        device = torch.device(device) if device else default_device()
        return load_checkpoint(ckpt, device, resolve_dtype(dtype, device))
    if device:
        raise ValueError("give --device or --device-map, not both")
    if device_map == AUTO:
        dtype = resolve_dtype(dtype, default_device())
        device_map = auto_map(ckpt, dtype, max_len, max_batch)
    device_map = DeviceMap.parse(device_map)
    dtype = resolve_dtype(dtype, resolve_device(device_map.entries[""]))
    return load_checkpoint(ckpt, dtype=dtype, device_map=device_map, keep_packed=True)


def auto_map(ckpt: str | os.PathLike, dtype: torch.dtype, max_len: int | None, max_batch: int) -> DeviceMap:
    """This machine's placement of the checkpoint (its accelerators' free memory, its available RAM), printed to
    stderr. Formats: what the loader keeps (a quantized checkpoint's format, else `dtype`) for every weight."""
    args, raw = read_config(ckpt)
    kept = {v: k for k, v in CACHE_DTYPES.items()}[dtype]
    quantized = raw.get("quantization_config") or {}
    if quantized.get("quant_method") == "dsv4":  # `dsv4 quantize` wrote it: the layers stay in its format
        fmt = quantized["format"]
        formats = Formats(fmt, fmt, kept, kept, quantized.get("group_size", Formats.group))
    elif quantized.get("quant_method") == "fp8":  # the release: FP4 experts and FP8 weights, kept packed
        formats = Formats("fp4", "fp8", kept, kept)
    else:
        formats = Formats(kept, kept, kept, kept)
    cards, ram = local_memory()
    p = plan(args, Hardware(cards, ram), min(max_len or args.max_seq_len, args.max_seq_len), max_batch, formats,
             name=os.fspath(ckpt))
    print(summary(p), file=sys.stderr, flush=True)
    return p.device_map


def summary(p: Plan) -> str:
    """A few lines on where the plan puts the model: its policy, memory per device, the map."""
    f = p.formats
    policy = p.policy if p.hardware.accelerators else "no accelerator: everything on the CPU"
    lines = [f"device map auto: {policy} (context {tokens(p.context)}, batch {p.batch}; weights {f.weights}, "
             f"routed experts {f.experts}, KV cache {f.cache})"]
    for dev, m in p.memory.items():
        lines.append(f"  {dev}: {gb(m['weights'])} weights + {gb(m['cache'])} KV cache, {gb(m['free'])} of "
                     f"{gb(m['capacity'])} left free: {holds(p, dev)}")
    return "\n".join([*lines, f"  --device-map '{json.dumps(p.device_map.to_dict())}'"])


def load_engine(model, tokenizer, max_len: int | None = None, max_batch: int = 1, compile: bool | str = False,
                speculative: bool | None = None, prefix_cache_gb: float = 0.0, max_step_tokens: int | None = None
                ) -> Engine:
    """An engine whose cache holds `max_len` tokens (at most the model's context - 1) for `max_batch` sequences,
    warmed up (Engine.warm_up).
    compile: False, True or "max" (see Engine). speculative: MTP speculation where the model has an MTP module;
    None = on unless compiled (compiled plain steps are so cheap that a draft + verify round costs about two).
    prefix_cache_gb, max_step_tokens: see Engine. compile="auto": True where torch.compile has a backend for the
    model's device."""
    max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len - 1)
    if compile == "auto":
        compile = can_compile(main_device(model) if getattr(model, "placement", None) is not None
                              else next(model.parameters()).device)
    speculative = not compile if speculative is None else speculative
    engine = Engine(model, tokenizer, max_batch=max_batch, max_len=max_len, speculative=speculative and bool(model.mtp),
                    compile=compile, prefix_cache_gb=prefix_cache_gb, max_step_tokens=max_step_tokens)
    # what would otherwise compile while the first request waits, compiled now and said on stderr (minutes the first
    # time with compile, then cached on disk)
    return engine.warm_up(lambda what: print(f"dsv4: {what}", file=sys.stderr, flush=True))


def context_len(model, max_len: int | None) -> int:
    """The longest prompt + completion `max_len` (None: the model's context) leaves room for."""
    return min(max_len or model.args.max_seq_len, model.args.max_seq_len) - 1
