"""What Engram costs: the memory's lookup + gating with its table in memory vs memory-mapped from a checkpoint file,
and the training step of the `make run` model with Engram (a table 10x the backbone's parameters) against the same
model without, at equal active parameters.

    python bench/engram.py --json bench/results/engram.json
    python bench/engram.py --no-conv --json bench/results/engram_noconv.json     # V4.1's variant

Lookup + gating: one Engram layer of the `make run` model's width reading a 16 x 256 batch of random ids, forward
only (what inference does per layer), the table held in RAM or memory-mapped from a safetensors file
(`dsv4.weights.tensors.mmap_tensor`: a cold page cache is not forced, so repeated reads hit pages already read).
Training step: `Trainer.train_step` as `dsv4 train` runs it (16 x 256 tokens, MTP, Muon + AdamW + RowAdam for the
table, eager, the CPU allocator tuned as the CLI tunes it), on a fixed batch; the Engram model's routed experts are
narrowed so that its active parameters (backbone + Engram's gating + the rows a token reads) equal the plain
model's. The two step functions alternate (A, B, A, B, ...) in one process so the machine's drift falls on both; the
overhead is the ratio of medians. Timing starts after --warmup steps of each: the first few dozen steps of a process
grow the heap (glibc) and fault its fresh pages in, more so for the model with more tensor shapes (Engram's first
ten steps fault ~13K pages each against ~4K, then ~1K against ~0.4K), so early steps measure the allocator, not
the step a 600-step run repeats.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

from dsv4.config import ModelArgs  # noqa: E402
from dsv4.device import tune_cpu_allocator  # noqa: E402
from dsv4.weights.info import Count, count_params, meta_model  # noqa: E402


def active(args: ModelArgs) -> int:
    parts = count_params(meta_model(args))
    return sum(parts["main"].values(), Count()).active + sum(parts["engram"].values(), Count()).active


def total(args: ModelArgs) -> int:
    return sum(count_params(meta_model(args))["main"].values(), Count()).total


def with_engram(base: ModelArgs, table_ratio: float, conv: bool = True) -> ModelArgs:
    """`base` + Engram with tables of table_ratio x base's parameters, the experts narrowed to base's active count."""
    args = base.with_engram()
    per_row = args.engram_dim // args.engram_heads
    rows = int(table_ratio * total(base) / per_row / len(args.engram_layers)
               / ((args.engram_max_ngram - 1) * args.engram_heads))
    args = base.with_engram(vocab=rows, conv=conv)
    target = active(base)
    best = min(range(8, base.moe_inter_dim + 1, 8), key=lambda inter: abs(
        active(ModelArgs.from_dict({**args.to_dict(), "moe_inter_dim": inter})) - target))
    return ModelArgs.from_dict({**args.to_dict(), "moe_inter_dim": best})


def lookup_bench(args: ModelArgs, reps: int) -> dict:
    from dsv4.model.transformer import Transformer
    from dsv4.weights.checkpoint import save_pretrained
    from dsv4.weights.tensors import mmap_tensor

    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    block = model.layers[args.engram_layers[0]]
    ids = torch.randint(0, args.vocab_size, (16, 256))
    h = torch.randn(16, 256, args.hc_mult, args.dim)
    out = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        save_pretrained(model, tmp)
        name = f"layers.{block.layer_id}.engram.table.weight"
        tables = {"in_memory": block.engram.table.weight.detach().clone(), "mmap": mmap_tensor(tmp, name)}
        times = {k: [] for k in tables}
        for _ in range(reps):
            for kind, table in tables.items():
                block.engram.table.weight.data = table
                start = time.perf_counter()
                rows = model.engram_rows(ids)[block.layer_id]
                block.engram(h, rows)
                times[kind].append(time.perf_counter() - start)
        for kind, t in times.items():
            out[kind] = {"median_s": statistics.median(t), "tok_per_s": ids.numel() / statistics.median(t)}
    out["mmap_over_memory"] = out["mmap"]["median_s"] / out["in_memory"]["median_s"]
    out["table_mb"] = tables["in_memory"].numel() * 4 / 2 ** 20
    return out


def step_bench(variants: dict[str, ModelArgs], steps: int, warmup: int, dtype: torch.dtype) -> dict:
    from dsv4.train.config import StageConfig
    from dsv4.train.pipeline import build_model
    from dsv4.train.trainer import Trainer

    B, T = 16, 256
    runners, tmp = {}, tempfile.mkdtemp()
    for name, args in variants.items():
        model = build_model(args, torch.device("cpu"), 0)
        tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        cfg = StageConfig(steps=10 ** 6, batch_size=B, seq_len=T, warmup=10, eval_every=10 ** 6, save_every=10 ** 6)
        trainer = Trainer(model, cfg, os.path.join(tmp, name), lambda s, t=tokens: iter(lambda: (t[:, :-1], t[:, 1:]),
                                                                                          None), [], dtype,
                          progress=False)
        micro = trainer.batches(0)
        runners[name] = (trainer, micro)
    for _ in range(warmup):
        for trainer, micro in runners.values():
            trainer.train_step(micro)
    times = {name: [] for name in variants}
    for _ in range(steps):
        for name, (trainer, micro) in runners.items():
            start = time.perf_counter()
            trainer.train_step(micro)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_step_s": statistics.median(t), "tok_per_s": B * T / statistics.median(t)}
            for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="v4-2m")
    p.add_argument("--table-ratio", type=float, default=10.0, help="Engram's table parameters / the backbone's")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per model first (the heap settles: see above)")
    p.add_argument("--reps", type=int, default=20, help="timed lookups per table")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--no-conv", action="store_true", help="Engram without the short convolution (V4.1's variant)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    tune_cpu_allocator()  # as `dsv4 train` does (dsv4.cli)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    base = ModelArgs.from_name(a.preset)
    eng = with_engram(base, a.table_ratio, conv=not a.no_conv)
    info = {name: {"total": total(args), "active": active(args), "moe_inter_dim": args.moe_inter_dim,
                   "engram_table": count_params(meta_model(args))["engram"]["table"].total}
            for name, args in (("plain", base), ("engram", eng))}
    steps = step_bench({"plain": base, "engram": eng}, a.steps, a.warmup, dtype)
    overhead = steps["engram"]["median_step_s"] / steps["plain"]["median_step_s"] - 1
    emit({"benchmark": "Engram: lookup + gating (table in memory vs memory-mapped) and the training step overhead at "
                       "equal active parameters", "preset": a.preset, "dtype": a.dtype,
          "engram": {k: getattr(eng, f"engram_{k}") for k in ("layers", "max_ngram", "heads", "vocab", "dim", "conv")},
          "params": info, "table_over_backbone": info["engram"]["engram_table"] / info["plain"]["total"],
          "lookup_gating": lookup_bench(eng, a.reps), "train_step": steps, "step_overhead": overhead,
          "target_overhead": 0.10}, a.json)


if __name__ == "__main__":
    main()
