"""A checkpoint directory -> an engine over it, as `dsv4 generate`, `dsv4 chat` and `dsv4 serve` open one.

    model, tok = load_model("runs/small/final", device="cpu", dtype="fp32")
    engine = load_engine(model, tok, max_len=8192, max_batch=8, compile=True)
"""

import os

import torch

from dsv4.device import default_device, resolve_dtype
from dsv4.engine.engine import Engine
from dsv4.weights.checkpoint import load_checkpoint


def load_model(ckpt: str | os.PathLike, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto"):
    """The checkpoint's (model in eval mode, tokenizer) on `device` (default: the accelerator if any) in `dtype`
    ("auto": the fastest that device has)."""
    device = torch.device(device) if device else default_device()
    return load_checkpoint(ckpt, device, resolve_dtype(dtype, device))


def load_engine(model, tokenizer, max_len: int | None = None, max_batch: int = 1, compile: bool | str = False,
                speculative: bool | None = None) -> Engine:
    """An engine whose cache holds `max_len` tokens (at most the model's context - 1) for `max_batch` sequences.
    compile: False, True or "max" (see Engine). speculative: MTP speculation where the model has an MTP module;
    None = on unless compiled (compiled plain steps are so cheap that a draft + verify round costs about two)."""
    max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len - 1)
    speculative = not compile if speculative is None else speculative
    return Engine(model, tokenizer, max_batch=max_batch, max_len=max_len, speculative=speculative and bool(model.mtp),
                  compile=compile)


def context_len(model, max_len: int | None) -> int:
    """The longest prompt + completion `max_len` (None: the model's context) leaves room for."""
    return min(max_len or model.args.max_seq_len, model.args.max_seq_len) - 1
