"""`dsv4 quantize`: a checkpoint -> the same model kept quantized in memory (int8, int4, fp8, fp4). Registered in
dsv4.cli's COMMANDS like the others."""

import argparse

from dsv4.kernels.quant import INT4_GROUP
from dsv4.kernels.qweight import FORMATS


def add_quantize(subparsers):
    p = subparsers.add_parser(
        "quantize", help="write a weight-only quantized copy of a checkpoint (int8, int4, fp8, fp4)",
        description="Quantize a checkpoint's linear layers and routed experts, weight-only: int8 (one scale per output "
        "row), int4 (one scale per --group inputs), fp8 e4m3 (one scale per 128x128 block) or fp4 e2m1 (one scale per "
        "32 inputs). The embedding, head, router and the small fp32 tensors stay as they are. The output is a "
        "checkpoint directory that eval, generate, chat, serve and info open as usual and that stays quantized in "
        "memory; tokenizer.json and train_config.json travel with it; OUT/quantization.json lists what was done.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="DIR", help="the checkpoint to quantize")
    p.add_argument("--to", required=True, choices=FORMATS, dest="fmt", help="the weight format")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the directory to write (replaced if present)")
    p.add_argument("--group", type=int, default=INT4_GROUP, help="int4: inputs per scale (32-128)")
    p.set_defaults(run=run_quantize)


def run_quantize(opts) -> int:
    from dsv4.weights.convert import quantize_checkpoint
    from dsv4.weights.info import human_bytes

    r = quantize_checkpoint(opts.ckpt, opts.out, opts.fmt, opts.group)
    dense = f"; kept dense (groups do not fit): {', '.join(r['kept_dense_groups_do_not_fit'])}" \
        if r["kept_dense_groups_do_not_fit"] else ""
    print(f"{opts.fmt}: {len(r['quantized'])} layers quantized, {human_bytes(r['bytes_before'])} -> "
          f"{human_bytes(r['bytes_after'])} ({r['bytes_after'] / r['bytes_before']:.2f}x){dense} -> {opts.out}")
    return 0
