"""Weight-only quantization side by side: decode speed and memory in fp32, bf16, int8 and int4 (batch 1, the compiled
engine) on `make run`'s model and on `small`, and the quality of the `make run` model in every format (held-out
bits per byte and greedy completions).

    python bench/quant.py --json bench/results/quant.json   # speed + memory on both models, quality on make run's
    python bench/quant.py --quality-only --json bench/results/quant_quality.json
    python bench/quant.py --speed-only --dtype fp32                # how a CPU without fast bf16 runs it
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python bench/quant.py --speed-only --dtype fp32 --json bench/results/quant_avx2.json   # ... on AVX2 alone
      (with those variables the compiled code goes to a cache of its own: inductor's does not key on them)
    python bench/quant.py --ceiling-of bench/results/quant.json --json bench/results/quant_ceiling.json

Each variant runs in its own subprocess, `--repeats` times, in interleaved order (fp32, bf16, int8, int4, fp32, ...)
so that drift of a noisy machine spreads over all of them; figures are medians and ratios to bf16.
    decode tok/s   `Engine(compile=True)`, a prompt of --prompt random tokens, then --new-tokens greedy tokens: tokens
                   after the first / time from the end of prefill (the second of two rounds: compiling not counted)
    weight bytes   the model's parameters and buffers as loaded (codes + scales for int8 / int4)
    peak RSS       the child's high-water mark (weights, cache, compiled code, the Python process)
The quantized variants compute in --dtype (auto: the fastest this CPU has); "fp32" and "bf16" are the dense model.
Quality: `dsv4 eval`'s held-out bits per byte and sample completions for the dense model (as trained, in fp32) and for
each format of `dsv4 quantize` (int8, int4, fp8, fp4), in fp32 so the formats' error is all that differs.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import add_run_args, emit, rss_kb, run_script_child, save_shared_checkpoint, watchdog  # noqa: E402

SPEED_VARIANTS = ("fp32", "bf16", "int8", "int4")
QUALITY_FORMATS = ("int8", "fp8", "int4", "fp4")
MAKE_RUN = "runs/v4-2m-engram/final"
CPU_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # an AVX2-only CPU, simulated


def child(opts) -> dict:
    import torch

    import dsv4
    from dsv4.device import resolve_dtype, tune_cpu_allocator
    from dsv4.engine import Engine, SamplingParams
    from dsv4.tokenizers.text import IdsOnly

    watchdog(opts.limit_kb)
    tune_cpu_allocator()
    if opts.variant in ("fp32", "bf16"):
        dtype = resolve_dtype(opts.variant)
    else:
        dtype = resolve_dtype(opts.dtype)
    model = dsv4.from_pretrained(opts.ckpt, device="cpu", dtype=dtype).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    g = torch.Generator().manual_seed(opts.seed)
    prompt = torch.randint(0, model.args.vocab_size, (opts.prompt,), generator=g).tolist()
    engine = Engine(model, IdsOnly(), max_batch=1, max_len=opts.prompt + opts.new_tokens + 1,
                    prefill_chunk=opts.prompt, speculative=False, compile=True)
    for _ in range(2):  # the first round compiles; the second is timed
        engine.submit(prompt, SamplingParams(temperature=0), max_new_tokens=opts.new_tokens, ignore_eos=True)
        while any(r.prefilling for r in engine.running) or engine.waiting:
            engine.step()
        n0, t1 = engine.stats["decode_tokens"], time.perf_counter()
        steps = []
        while engine.has_work():
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
        t2 = time.perf_counter()
    return {"decode_tok_s": (engine.stats["decode_tokens"] - n0) / (t2 - t1), "median_step_s": statistics.median(steps),
            "weight_bytes": weight_bytes, "peak_rss_bytes": rss_kb("VmHWM") * 1024, "dtype": str(dtype)}


def quantized_copies(ckpt: str, root: str, formats) -> dict[str, str]:
    """{format: directory} of `dsv4 quantize` copies of `ckpt` (under `root`), made once."""
    from dsv4.weights.convert import quantize_checkpoint

    out = {}
    for fmt in formats:
        out[fmt] = os.path.join(root, fmt)
        if not os.path.exists(os.path.join(out[fmt], "config.json")):
            quantize_checkpoint(ckpt, out[fmt], fmt)
    return out


def speed(name: str, ckpt: str, root: str, opts) -> dict:
    """Every variant of one model, `repeats` rounds in interleaved order -> medians and ratios to bf16."""
    dirs = {"fp32": ckpt, "bf16": ckpt, **quantized_copies(ckpt, root, ("int8", "int4"))}
    runs: dict[str, list[dict]] = {v: [] for v in SPEED_VARIANTS}
    for r in range(opts.repeats):
        for v in SPEED_VARIANTS:
            res = run_script_child(__file__, ["--child", "ours", "--variant", v, "--ckpt", dirs[v], "--dtype",
                                              opts.dtype, "--prompt", str(opts.prompt), "--new-tokens",
                                              str(opts.new_tokens), "--seed", str(opts.seed)], opts.timeout)
            print(f"{name} {v} round {r + 1}: {res}", file=sys.stderr)
            runs[v].append(res)
    table = {}
    for v, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            table[v] = {"error": rs[-1].get("error"), "stderr": rs[-1].get("stderr")}
            continue
        table[v] = {"decode_tok_s": statistics.median(x["decode_tok_s"] for x in ok),
                    "decode_tok_s_runs": [round(x["decode_tok_s"], 1) for x in ok],
                    "weight_bytes": ok[0]["weight_bytes"], "peak_rss_bytes": max(x["peak_rss_bytes"] for x in ok),
                    "compute_dtype": ok[0]["dtype"]}
    for dense in ("bf16", "fp32"):  # bf16: the target's baseline; fp32: the fastest dense dtype of a CPU without bf16
        base = table.get(dense, {})
        for v in table:
            if "decode_tok_s" in table[v] and "decode_tok_s" in base:
                table[v][f"decode_vs_{dense}"] = round(table[v]["decode_tok_s"] / base["decode_tok_s"], 3)
                table[v][f"weight_bytes_vs_{dense}"] = round(table[v]["weight_bytes"] / base["weight_bytes"], 3)
    return table


def quality(ckpt: str, opts) -> dict:
    """Held-out bpb and greedy completions of the dense model and of each quantized copy (fp32 compute)."""
    from dsv4.eval.run import evaluate

    dirs = {"dense": ckpt, **quantized_copies(ckpt, os.path.dirname(ckpt.rstrip("/")), QUALITY_FORMATS)}
    out = {}
    for name, d in dirs.items():
        r = evaluate(d, max_tokens=opts.bpb_tokens, dtype="fp32")
        out[name] = {"bpb": r["bpb"]["bpb"], "syntax": r["syntax"], "samples": [s["completion"] for s in r["samples"]]}
    for name in out:
        out[name]["bpb_vs_dense"] = round(out[name]["bpb"] / out["dense"]["bpb"], 4)
    out["prompts"] = [s["prompt"] for s in r["samples"]]
    return out


def ceiling(report_path: str, context: int) -> dict:
    """How far int8 can beat bf16 at batch 1 on `small` here: the bf16 step (from a report of this script) less the
    time its weights take to read at this machine's bandwidth, plus half that (int8 reads half the bytes), assuming
    everything else in the step stays as it is and the weights stream at the full read bandwidth."""
    from decode import bytes_per_decode_step, read_bandwidth

    import dsv4

    with open(report_path) as f:
        speed = json.load(f)["speed"]["small"]
    step = 1 / speed["bf16"]["decode_tok_s"]
    weights = bytes_per_decode_step(dsv4.ModelArgs.from_name("small"), 2, context)["weights"]
    bandwidth = read_bandwidth()
    reading = weights / bandwidth
    return {"report": report_path, "bf16_step_s": step, "bf16_weight_bytes_per_step": weights,
            "read_bandwidth_bytes_s": bandwidth, "bf16_weight_read_s": reading,
            "weights_share_of_bf16_step": reading / step,
            "int8_ceiling_vs_bf16": step / (step - reading / 2),
            "free_weights_ceiling_vs_bf16": step / (step - reading),
            "int8_measured_vs_bf16": speed["int8"]["decode_vs_bf16"]}


def parent(opts) -> dict:
    report = {"args": vars(opts).copy(), "env": {k: os.environ[k] for k in CPU_LIMITS if k in os.environ}}
    if not opts.quality_only:
        report["speed"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            small = os.path.join(tmp, "small")
            save_shared_checkpoint("small", opts.seed, small)
            report["speed"]["small"] = speed("small", small, tmp, opts)
            if os.path.exists(opts.make_run):
                report["speed"]["make_run"] = speed("make_run", opts.make_run, os.path.join(tmp, "make_run"), opts)
    if os.path.exists(opts.make_run) and not opts.speed_only:
        report["quality"] = quality(opts.make_run, opts)
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--variant", choices=SPEED_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--make-run", default=MAKE_RUN, help="the `make run` checkpoint")
    p.add_argument("--dtype", default="auto", help="compute dtype of the quantized variants")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bpb-tokens", type=int, default=0, help="held-out tokens for bpb (0: all)")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--quality-only", action="store_true")
    p.add_argument("--ceiling-of", metavar="REPORT", help="instead: int8's ceiling against bf16 on `small` from a "
                   "report of this script and this machine's read bandwidth")
    opts = p.parse_args()
    if opts.impl:
        print(json.dumps(child(opts)))
        return
    if opts.ceiling_of:
        emit(ceiling(opts.ceiling_of, opts.prompt + opts.new_tokens // 2), opts.json)
        return
    limits = [os.environ[k] for k in CPU_LIMITS if k in os.environ]
    if limits and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # inductor's cache does not key on these: kernels built for AVX2 and loaded by a process with AVX512 torch
        # corrupted its heap here; the children get a cache of their own
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "torchinductor_" +
                                                             "_".join(limits).lower())
    emit(parent(opts), opts.json)


if __name__ == "__main__":
    main()
