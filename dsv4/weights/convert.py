"""`dsv4 quantize`: a checkpoint directory -> the same model with its linear layers and routed experts kept quantized
(dsv4.model.quantized), in a directory every command opens like any other.

    quantize_checkpoint("runs/v4-2m-engram/final", "runs/v4-2m-engram/int8", "int8")

It streams: the model is built on `meta`, the whole checkpoint is matched and checked from its headers, and then one
piece at a time (the embedding, head and final norms, then each block) is read, quantized, written into the current
shard and let go. Memory holds one block and one shard, so V4-Flash (43 blocks of ~6.6B weights, 284B in all) converts
on a machine that could not hold it decoded. Stacked experts go through the quantizer a few at a time
(dsv4.kernels.qweight.quantize).

The output holds the codes and scales in the dsv4 layout (`X.weight` codes + `X.scale`, as the release names its
quantized weights; `experts.w13` + `experts.w13_scale`), config.json with `quantization_config` = {"quant_method":
"dsv4", "format", "group_size"} (what makes a loader quantize the model it builds before reading, so the codes are
copied as stored and stay codes in memory), and every other file of the source (tokenizer.json, train_config.json,
plots) copied as is. Written into a temporary directory and moved into place whole: a failure leaves nothing behind.
"""

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from dsv4.atomic import atomic_dir
from dsv4.kernels.quant import INT4_GROUP
from dsv4.model.quantized import choose, quantize_modules
from dsv4.weights.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    checkpoint_args,
    checkpoint_config,
    export,
    plan_reading,
    read_into,
    write_json,
)
from dsv4.weights.placement import reallocate
from dsv4.weights.shards import ShardWriter

REPORT_FILE = "quantization.json"


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, group: int = INT4_GROUP,
                        max_shard_bytes: int = 4 * 2**30, progress: bool = True) -> dict:
    """Quantize the checkpoint at `src` into `dst` (replaced if it exists; never `src` itself). Returns the report
    also written to dst/quantization.json: which layers were quantized, which stayed dense, bytes before and after."""
    from dsv4.model.transformer import Transformer

    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if src == dst:
        raise ValueError("write the quantized checkpoint to another directory (-o), not over its source")
    args, raw = checkpoint_args(src)
    if (raw.get("quantization_config") or {}).get("quant_method") == "dsv4":
        raise ValueError(f"{src} is already quantized ({raw['quantization_config']['format']})")
    with torch.device("meta"):
        model = Transformer(args)
    if _sixteen_bit(raw):  # the release (FP8/FP4, decoded exactly into bf16) or a bf16 checkpoint: half the memory
        model.to_dtype(torch.bfloat16)
    reading = plan_reading(model, src)  # every problem, before anything is read or written
    chosen = choose(model, fmt, group)
    before = _bytes(model)
    quantization = {"quant_method": "dsv4", "format": fmt, "group_size": group}
    with atomic_dir(dst) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        parts = list(pieces(model))
        for only in tqdm(parts, desc=f"quantize {fmt}", unit="block", file=sys.stderr, disable=not progress):
            place(model, only, "cpu")
            read_into(model, reading, only=only)
            quantize_modules(model, {p: fmt for p in chosen.quantized if only(p + ".")}, group)
            for name, t in export(model, "dsv4", only=only):
                writer.add(name, t)
            place(model, only, "meta")  # let the block go (the writer keeps what its current shard still needs)
        fnames, index = writer.close()
        write_json(os.path.join(tmp, CONFIG_FILE), checkpoint_config(args, "dsv4", model.embed.weight.dtype,
                                                                     quantization))
        write_json(os.path.join(tmp, INDEX_FILE), index)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(".safetensors") and name not in (CONFIG_FILE, INDEX_FILE):
                shutil.copy2(path, os.path.join(tmp, name))
        result = {"source": src, "format": fmt, "group_size": group if fmt == "int4" else None,
                  "bytes_before": before, "bytes_after": writer.total_bytes, "shards": len(fnames),
                  "quantized": chosen.quantized, "kept_dense_groups_do_not_fit": chosen.dense,
                  "kept_dense": "embedding, head (4-bit formats), router, norms, hyper-connections, attention sinks"}
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    return result


def pieces(model: nn.Module) -> Iterator[Callable[[str], bool]]:
    """What the converter takes one at a time, as predicates on tensor names: everything outside the blocks (the
    embedding, the head and the final norms: one piece, so a tied head meets its embedding), then each block."""
    yield lambda name: not name.startswith(("layers.", "mtp."))
    for prefix in [f"layers.{i}." for i in range(len(model.layers))] + [f"mtp.{j}." for j in range(len(model.mtp))]:
        yield lambda name, prefix=prefix: name.startswith(prefix)


def place(model: nn.Module, only: Callable[[str], bool], device: str | torch.device) -> None:
    """Give the tensors `only` picks new empty storage on `device` (on "meta": no storage, which lets their data go)."""
    reallocate(model, lambda name: device if only(name) else None, lambda t, d: torch.empty_like(t, device=d))


def _sixteen_bit(raw: dict) -> bool:
    """Whether the checkpoint's weights fit bf16 exactly: the release's FP8/FP4, or stored in bf16."""
    return (raw.get("quantization_config") or {}).get("quant_method") == "fp8" \
        or (raw.get("torch_dtype") or raw.get("dtype")) == "bfloat16"


def _bytes(model) -> int:
    """Bytes of the model's weights and buffers (on `meta` too), each storage once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
