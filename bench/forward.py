"""Forward-pass throughput and peak memory: dsv4 vs transformers.DeepseekV4ForCausalLM, same config, same weights.

    python bench/forward.py                       # small preset, fp32, seq 512 2048 8192, batch 1
    python bench/forward.py --dtype bf16 --seq 1024 4096
    python bench/forward.py --quick               # smoke run: seq 128 512, one timed repeat
    python bench/forward.py --ours-only --quick   # dsv4 alone, no transformers needed

Weights: our model (the preset without its MTP module, which transformers does not build) is built with a fixed
seed, written with `save_pretrained` to a temporary directory, and both implementations load that directory in the
chosen dtype. Every (implementation, length) pair runs in a fresh subprocess so peak memory is not polluted by the
other model or another length:
    peak_mb     = peak RSS during the forwards - RSS after imports   (weights + activations)
    forward_mb  = peak RSS during the forwards - RSS after loading   (what a forward adds)
    tok_s       = seq_len / median seconds of `repeats` forwards (after one warm-up), no grad, CPU
Peak RSS is the kernel's VmHWM, reset after loading through /proc/self/clear_refs. (getrusage's ru_maxrss would also
keep the loader's peak: the kernel folds it into the process maximum when a loader thread exits.) Weights are read
once after loading, so memory-mapped ones count as weights. A child whose RSS would pass the memory limit (default
90% of available memory) stops itself and reports "oom".
`logits_max_abs_diff` compares the last 8 positions' logits. It is ~1e-6 in fp32 until the lightning indexer has more
than index_topk entries to choose from; past that, exact score ties (fresh weights leave many queries with all-zero
ReLU scores) are broken differently (dsv4 prefers the recent entry, torch.topk is unspecified), so logits may differ.
Prints one JSON document; ratios are ours / theirs (speedup > 1 and memory ratio < 1 favour dsv4).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

SEQS = (512, 2048, 8192)
QUICK_SEQS = (128, 512)


# bench/ is on sys.path when these run as scripts
from common import add_run_args, emit, rss_kb, run_script_child, save_shared_checkpoint, watchdog  # noqa: E402


# --- the child: one implementation, one length ---
def child(opts) -> dict:
    import torch
    from safetensors.torch import save_file

    from dsv4.device import resolve_dtype, tune_cpu_allocator

    watchdog(opts.limit_kb)
    if opts.tune_allocator == "both" or opts.tune_allocator == opts.impl:
        tune_cpu_allocator()
    dtype = resolve_dtype(opts.dtype)
    base_kb = rss_kb()
    start = time.perf_counter()
    if opts.impl == "ours":
        import dsv4

        model = dsv4.from_pretrained(opts.ckpt, device="cpu", dtype=dtype).eval()
        if opts.compile:
            from dsv4.kernels.compile import compile_hot_paths

            compile_hot_paths(model)

        def forward(ids):
            return model(ids)
    else:
        import transformers

        model = transformers.DeepseekV4ForCausalLM.from_pretrained(opts.ckpt, dtype=dtype).eval()

        def forward(ids):
            return model(ids, use_cache=False).logits
    load_s = time.perf_counter() - start
    with torch.no_grad():  # page in weights a loader left memory-mapped, so they count as weights, not activations
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    seq = opts.seq[0]
    vocab = model.config.vocab_size if opts.impl == "theirs" else model.args.vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    loaded_kb = rss_kb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM): from here on, forwards only
        f.write("5")
    times = []
    with torch.no_grad():
        for i in range(opts.repeats + 1):
            start = time.perf_counter()
            logits = forward(ids)
            if i:  # the first call is warm-up (and compilation, with --compile)
                times.append(time.perf_counter() - start)
            else:
                warmup_s = time.perf_counter() - start
    peak_kb = rss_kb("VmHWM")
    save_file({"logits": logits[0, -8:].float().contiguous()}, opts.logits_out)  # the parent compares the two
    seconds = statistics.median(times)
    return {"tok_s": seq / seconds, "best_tok_s": seq / min(times), "seconds": times, "load_s": load_s,
            "warmup_s": warmup_s,
            "peak_mb": (peak_kb - base_kb) / 1024, "forward_mb": (peak_kb - loaded_kb) / 1024,
            "weights_mb": (loaded_kb - base_kb) / 1024}


def run_child(impl: str, seq: int, ckpt: str, opts, logits_out: str) -> dict:
    args = ["--child", impl, "--ckpt", ckpt, "--seq", str(seq), "--dtype", opts.dtype, "--repeats", str(opts.repeats),
            "--limit-kb", str(opts.limit_kb), "--logits-out", logits_out, "--tune-allocator", opts.tune_allocator
            ] + ["--compile"] * opts.compile
    return run_script_child(__file__, args, opts.timeout)


def parent(opts) -> dict:
    import torch
    from safetensors.torch import load_file

    from dsv4.device import resolve_dtype

    seqs = opts.seq or (QUICK_SEQS if opts.quick else SEQS)
    impls = ("ours",) if opts.ours_only else ("ours", "theirs")
    results = {"preset": opts.preset, "dtype": str(resolve_dtype(opts.dtype)).removeprefix("torch."),
               "batch": 1, "repeats": opts.repeats, "threads": torch.get_num_threads(),
               "tuned_allocator": opts.tune_allocator, "compiled": opts.compile,
               "memory_limit_mb": opts.limit_kb // 1024, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        save_shared_checkpoint(opts.preset, opts.seed, tmp)
        for seq in seqs:
            row = {"seq": seq}
            for impl in impls:
                row[impl] = run_child(impl, seq, tmp, opts, os.path.join(tmp, f"logits-{impl}-{seq}.safetensors"))
                brief = {k: v for k, v in row[impl].items() if k != "stderr"}
                print(f"seq {seq} {impl}: {brief}", file=sys.stderr, flush=True)
            ours, theirs = row["ours"], row.get("theirs", {})
            if "tok_s" in ours and "tok_s" in theirs:
                row["speedup"] = ours["tok_s"] / theirs["tok_s"]
                row["peak_mem_ratio"] = ours["peak_mb"] / theirs["peak_mb"]
                row["forward_mem_ratio"] = ours["forward_mb"] / max(theirs["forward_mb"], 1e-9)
                a, b = (load_file(os.path.join(tmp, f"logits-{i}-{seq}.safetensors"))["logits"] for i in impls)
                row["logits_max_abs_diff"] = (a - b).abs().max().item()  # same weights: should be ~0 in fp32
            results["runs"].append(row)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, nargs="+", help=f"sequence lengths (default {' '.join(map(str, SEQS))})")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (both implementations use it)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per length (median reported)")
    p.add_argument("--quick", action="store_true", help="smoke run: short sequences, one timed repeat")
    p.add_argument("--compile", action="store_true", help="dsv4 with compile_hot_paths() (torch.compile)")
    p.add_argument("--tune-allocator", choices=("ours", "both", "none"), default="ours",
                   help="which side gets dsv4.device.tune_cpu_allocator() (dsv4's entry points call it; "
                        "transformers does not) -- 'both' measures the reference with it too")
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    add_run_args(p)
    opts = p.parse_args()
    if opts.quick and opts.repeats == 3:
        opts.repeats = 1
    if opts.impl:
        print(json.dumps(child(opts)), flush=True)
    else:
        emit(parent(opts), opts.json)


if __name__ == "__main__":
    main()
