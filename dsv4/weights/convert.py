"""`dsv4 quantize`: a checkpoint directory -> the same model with its linear layers and routed experts kept quantized
(dsv4.model.quantized), in a directory every command opens like any other.

    quantize_checkpoint("runs/v4-2m-engram/final", "runs/v4-2m-engram/int8", "int8")

The output holds the codes and scales in the dsv4 layout (`X.weight` codes + `X.scale`, as the release names its
quantized weights; `experts.w13` + `experts.w13_scale`), config.json with `quantization_config` = {"quant_method":
"dsv4", "format", "group_size"} (what makes a loader quantize the model it builds before reading, so the codes are
copied as stored and stay codes in memory), and every other file of the source (tokenizer.json, train_config.json,
plots) copied as is. Written into a temporary directory and moved into place whole: a failure leaves nothing behind.
"""

import json
import os
import shutil

from dsv4.atomic import atomic_dir
from dsv4.kernels.quant import INT4_GROUP
from dsv4.model.quantized import quantize_model
from dsv4.weights.checkpoint import CONFIG_FILE, INDEX_FILE, from_pretrained, read_config, save_pretrained

REPORT_FILE = "quantization.json"


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, group: int = INT4_GROUP) -> dict:
    """Quantize the checkpoint at `src` into `dst` (replaced if it exists; never `src` itself). Returns the report
    also written to dst/quantization.json: which layers were quantized, which stayed dense, bytes before and after."""
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if src == dst:
        raise ValueError("write the quantized checkpoint to another directory (-o), not over its source")
    _, raw = read_config(src)
    if (raw.get("quantization_config") or {}).get("quant_method") == "dsv4":
        raise ValueError(f"{src} is already quantized ({raw['quantization_config']['format']})")
    model = from_pretrained(src, device="cpu")  # the weights in their stored dtypes (release FP8/FP4 decoded)
    before = _bytes(model)
    report = quantize_model(model, fmt, group)
    result = {"source": src, "format": fmt, "group_size": group if fmt == "int4" else None,
              "bytes_before": before, "bytes_after": _bytes(model),
              "quantized": report.quantized, "kept_dense_groups_do_not_fit": report.dense,
              "kept_dense": "embedding, head, router, norms, hyper-connections, attention sinks"}
    with atomic_dir(dst) as tmp:
        save_pretrained(model, tmp, layout="dsv4")
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(".safetensors") and name not in (CONFIG_FILE, INDEX_FILE):
                shutil.copy2(path, os.path.join(tmp, name))
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(result, f, indent=1)
    return result


def _bytes(model) -> int:
    """Bytes of the model's weights and buffers, each storage once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
