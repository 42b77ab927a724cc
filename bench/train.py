"""Training throughput: dsv4's trainer step vs transformers.DeepseekV4ForCausalLM, same config, weights and batch,
plus model FLOPs utilisation (MFU) against this machine's measured matmul peak.

    python bench/train.py                          # small preset; batch 8 x 512 and 2 x 2048; bf16 where fast
    python bench/train.py --shape 4x512 --repeats 5
    python bench/train.py --quick --ours-only      # smoke run

One training step = forward + backward + AdamW step on one batch, the same for both sides:
    dsv4 "plain"   `dsv4.train.Trainer.train_step` with the LM loss only (no MTP, no indexer KL, no balance loss):
                   the same work as the reference. Mixed precision as the trainer runs it: bf16 compute weights,
                   fp32 master weights and AdamW state.
    dsv4 "compiled" the same step with `Trainer.compile()` (compiled blocks: what `dsv4 train` uses where it can);
                   compilation happens in the warm-up steps, which are not timed (for either side).
    dsv4 "v4"      compiled, with V4's training signals on top: the lightning indexer's KL loss and the sequence-wise
                   balance loss (no MTP: the checkpoint both sides load has no MTP module).
    transformers   `model(ids, labels=ids).loss.backward(); AdamW(fused=True).step()`, timed both ways a user would
                   run it in bf16 -- fp32 weights under torch.autocast(bf16), and weights cast to bf16 -- and
                   compared at the faster of the two.
Each (implementation, mode, shape) runs in its own subprocess; tokens/s = batch * seq / median step seconds over
`repeats` steps after one warm-up step.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token = 3 x the forward FLOPs per token (`dsv4 info`'s
count: 2 x active weights incl. the head, attention scores and values over the window and compressed entries, and
the indexer scan) at the mean context seq/2, for the main model. Peak = the best of
bf16 (or fp32) square matmuls of size 1024..4096 on this machine, measured in this run.
Prints one JSON document.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

# bench/ is on sys.path when these run as scripts
from common import add_run_args, emit, run_script_child, save_shared_checkpoint, watchdog  # noqa: E402

SHAPES = ("8x512", "2x2048")
QUICK_SHAPES = ("2x128",)


def matmul_peak(dtype) -> float:
    """Best FLOP/s of square matmuls in `dtype` (median of 5 per size, best size)."""
    import torch

    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n ** 3 / statistics.median(times))
    return best


def model_flops_per_token(args, seq: int) -> float:
    from dsv4.weights import info

    f = info.model_info(args, contexts=[max(seq // 2, 1)])["flops_per_token"][str(max(seq // 2, 1))]
    return 3 * f["total"]


# --- the child: one implementation, one mode, one shape ---
def child(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype, tune_cpu_allocator

    watchdog(opts.limit_kb)
    tune_cpu_allocator()
    dtype = resolve_dtype(opts.dtype)
    B, S = map(int, opts.shape.split("x"))
    if opts.impl == "ours":
        import dsv4
        from dsv4.train.config import StageConfig
        from dsv4.train.trainer import Trainer

        model = dsv4.from_pretrained(opts.ckpt, device="cpu", dtype=torch.float32)
        v4 = opts.mode == "v4"
        cfg = StageConfig(steps=10 ** 9, batch_size=B, seq_len=S, optimizer="adamw", lr=1e-4, warmup=1,
                          mtp_weight=0.0, aux_alpha=1e-4 if v4 else 0.0,
                          indexer_weight=1.0 if v4 else 0.0, indexer_warmup=0)
        ids = torch.randint(0, model.args.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
        batches = lambda start: iter(lambda: (ids[:, :-1], ids[:, 1:]), None)  # noqa: E731
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(model, cfg, run_dir, batches, [], dtype, progress=False)
            if opts.mode != "plain":
                trainer.compile()
            micro = batches(0)
            step = lambda: trainer.train_step(micro)  # noqa: E731
            times = timed(step, opts.repeats, warmup=1 if opts.mode == "plain" else 3)
    else:
        import transformers

        model = transformers.DeepseekV4ForCausalLM.from_pretrained(opts.ckpt, dtype=torch.float32)
        if opts.mode == "bf16":
            model = model.to(dtype)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the fast kernel, as dsv4 uses
        ids = torch.randint(0, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
        autocast = opts.mode == "autocast" and dtype != torch.float32

        def step():
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times = timed(step, opts.repeats)
    seconds = statistics.median(times)
    return {"tok_s": B * S / seconds, "seconds": times}


def timed(step, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_child(impl: str, mode: str, shape: str, ckpt: str, opts) -> dict:
    args = ["--child", impl, "--mode", mode, "--ckpt", ckpt, "--shape", shape, "--dtype", opts.dtype,
            "--repeats", str(opts.repeats), "--limit-kb", str(opts.limit_kb)]
    return run_script_child(__file__, args, opts.timeout)


def parent(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype

    dtype = resolve_dtype(opts.dtype)
    shapes = opts.shape or (QUICK_SHAPES if opts.quick else SHAPES)
    peak = matmul_peak(dtype)
    results = {"preset": opts.preset, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "repeats": opts.repeats, "matmul_peak_tflops": peak / 1e12, "runs": []}
    print(f"matmul peak ({results['dtype']}): {peak / 1e12:.2f} TFLOP/s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = save_shared_checkpoint(opts.preset, opts.seed, tmp)
        for shape in shapes:
            B, S = map(int, shape.split("x"))
            row = {"batch": B, "seq": S}
            plan = [("ours", "plain"), ("ours", "compiled"), ("ours", "v4")]
            if not opts.ours_only:
                plan += [("theirs", "autocast"), ("theirs", "bf16")] if dtype != torch.float32 else [("theirs", "fp32")]
            for impl, mode in plan:
                r = run_child(impl, mode, shape, tmp, opts)
                if "tok_s" in r:
                    flops = model_flops_per_token(args, S)
                    r["mfu"] = r["tok_s"] * flops / peak
                row[f"{impl}_{mode}"] = r
                print(f"{shape} {impl} {mode}: { {k: v for k, v in r.items() if k != 'stderr'} }", file=sys.stderr,
                      flush=True)
            theirs = [row[k]["tok_s"] for k in row if k.startswith("theirs_") and "tok_s" in row[k]]
            if theirs:
                row["reference_tok_s"] = max(theirs)
                for mode in ("plain", "compiled", "v4"):
                    if "tok_s" in row[f"ours_{mode}"]:
                        row[f"speedup_{mode}"] = row[f"ours_{mode}"]["tok_s"] / max(theirs)
            results["runs"].append(row)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--shape", nargs="+", help=f"BATCHxSEQ (default {' '.join(SHAPES)})")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast) | bf16 | fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per run (median reported)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, one timed step")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    add_run_args(p)
    opts = p.parse_args()
    if opts.quick and opts.repeats == 3:
        opts.repeats = 1
    if opts.impl:
        opts.shape = opts.shape[0]
        print(json.dumps(child(opts)), flush=True)
    else:
        emit(parent(opts), opts.json)


if __name__ == "__main__":
    main()
