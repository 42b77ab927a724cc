"""Long context: prefill time and peak memory from 4K to 128K tokens (and 1M) for the `tiny` and `small` presets,
dsv4's inference engine side by side with transformers.DeepseekV4ForCausalLM where that fits, and decode speed at each
length.

    python bench/longctx.py                                   # tiny + small at 1K 4K 16K 64K 128K, then 1M tiny
    python bench/longctx.py --presets tiny --lengths 4096 16384 --no-million --ours-only
    python bench/longctx.py --presets --million               # only the 1M-token run of tiny

Weights: each preset without its MTP module (transformers builds none), max_seq_len raised to 1M, freshly initialised
with a fixed seed and saved once; both sides load it in the compute dtype (bf16 where fast). Prompts are random ids.
Every (implementation, preset, length) runs in its own subprocess:
    dsv4           `Engine(max_batch=1)`: chunked prefill (512 tokens a step, the indexer's long-context scan
                   compiled), then `new_tokens` greedy decode steps (eager, as `dsv4 generate` runs by default)
    transformers   one forward over the prompt with a cache (its prefill), then `generate` for the decode tokens
    prefill_s      wall time of the prefill (dsv4: including the scan's first compile, a few seconds; disk-cached after)
    decode_tok_s   tokens / wall time of the decode steps after the first
    peak_rss_mb    the process's peak resident memory (VmHWM) over load + prefill + decode, Python and torch included
    base_rss_mb    its resident memory after loading the weights, before the prefill
A side stops itself at 90% of the memory available ("oom"); once transformers fails at a length its longer lengths are
skipped. Prints one JSON document, with targets: 128K prefill of tiny < 2 min and < 4 GB; 1M < 30 min and < 16 GB;
decode at 128K >= 1/3 of decode at 1K.
"""

import argparse
import json
import os
import sys
import tempfile
import time

# bench/ is on sys.path when these run as scripts
from common import add_run_args, emit, rss_kb, run_script_child, save_shared_checkpoint, watchdog  # noqa: E402

LENGTHS = (1024, 4096, 16384, 65536, 131072)
MILLION = 1 << 20


def child(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype, tune_cpu_allocator

    watchdog(opts.limit_kb)
    tune_cpu_allocator()
    dtype = resolve_dtype(opts.dtype)
    L, N = opts.length, opts.new_tokens
    g = torch.Generator().manual_seed(opts.seed)
    if opts.impl == "ours":
        import dsv4
        from dsv4.engine import Engine, SamplingParams
        from dsv4.tokenizers.text import IdsOnly

        model = dsv4.from_pretrained(opts.ckpt, device="cpu", dtype=dtype).eval()
        L = min(L, model.args.max_seq_len - N - 1)  # 1M: the prompt and the decoded tokens fill the whole context
        ids = torch.randint(0, model.args.vocab_size, (L,), generator=g).tolist()
        engine = Engine(model, IdsOnly(), max_batch=1, max_len=L + N + 1)
        base = rss_kb()
        engine.submit(ids, SamplingParams(temperature=0), max_new_tokens=N, ignore_eos=True)
        t0 = time.perf_counter()
        while any(r.prefilling for r in engine.running) or engine.waiting:
            engine.step()
        t1 = time.perf_counter()
        engine.step()  # the first decode step (its sample is the prefill's)
        t2 = time.perf_counter()
        n0 = engine.stats["decode_tokens"]
        while engine.has_work():
            engine.step()
        t3 = time.perf_counter()
        return {"prompt_tokens": L, "prefill_s": t1 - t0,
                "decode_tok_s": (engine.stats["decode_tokens"] - n0) / (t3 - t2),
                "peak_rss_mb": rss_kb("VmHWM") / 1024, "base_rss_mb": base / 1024,
                "cache_mb": engine.cache.nbytes() / 2 ** 20}
    import transformers

    model = transformers.DeepseekV4ForCausalLM.from_pretrained(opts.ckpt, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g)
    base = rss_kb()
    stamps = []

    class Clock(transformers.LogitsProcessor):  # called once per generated token, when its logits are ready
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        del out
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                       do_sample=False, pad_token_id=0, logits_processor=[Clock()])
    # generate prefills again; its decode tokens are timed from the first token's logits on
    return {"prefill_s": t1 - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "peak_rss_mb": rss_kb("VmHWM") / 1024, "base_rss_mb": base / 1024}


def run_child(impl: str, ckpt: str, length: int, opts) -> dict:
    args = ["--child", impl, "--ckpt", ckpt, "--length", str(length), "--new-tokens", str(opts.new_tokens),
            "--dtype", opts.dtype, "--seed", str(opts.seed), "--limit-kb", str(opts.limit_kb)]
    result = run_script_child(__file__, args, opts.timeout)
    print(f"{impl} {length}: {result}", file=sys.stderr, flush=True)
    return result


def parent(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype

    results = {"dtype": str(resolve_dtype(opts.dtype)).removeprefix("torch."), "threads": torch.get_num_threads(),
               "new_tokens": opts.new_tokens, "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in opts.presets + (["tiny"] if opts.million and "tiny" not in opts.presets else []):
            ckpt = os.path.join(tmp, preset)
            save_shared_checkpoint(preset, opts.seed, ckpt, max_seq_len=MILLION)
            rows, theirs_ok = [], not opts.ours_only
            lengths = list(opts.lengths) if preset in opts.presets else []
            if opts.million and preset == "tiny":
                lengths.append(MILLION)
            for L in lengths:
                row = {"length": L, "ours": run_child("ours", ckpt, L, opts)}
                if theirs_ok and L < MILLION:
                    row["transformers"] = run_child("theirs", ckpt, L, opts)
                    theirs_ok = "error" not in row["transformers"]
                    if theirs_ok:
                        row["prefill_speedup"] = row["transformers"]["prefill_s"] / row["ours"]["prefill_s"]
                        row["peak_rss_ratio"] = row["ours"]["peak_rss_mb"] / row["transformers"]["peak_rss_mb"]
                        row["decode_speedup"] = row["ours"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
                rows.append(row)
            results["presets"][preset] = {"runs": rows, "targets": targets(preset, rows, opts.new_tokens)}
    return results


def targets(preset: str, rows: list[dict], new_tokens: int) -> dict:
    ours = {r["length"]: r["ours"] for r in rows if "error" not in r["ours"]}
    out = {}
    if 1024 in ours and 131072 in ours:
        ratio = ours[131072]["decode_tok_s"] / ours[1024]["decode_tok_s"]
        out["decode_128k_over_1k"] = {"value": ratio, "target": ">= 0.333", "met": ratio >= 1 / 3}
    if preset == "tiny" and 131072 in ours:
        r = ours[131072]
        out["prefill_128k"] = {"s": r["prefill_s"], "peak_gb": r["peak_rss_mb"] / 1024, "target": "< 120 s, < 4 GB",
                               "met": r["prefill_s"] < 120 and r["peak_rss_mb"] < 4096}
    if preset == "tiny" and MILLION in ours:
        r = ours[MILLION]
        total = r["prefill_s"] + new_tokens / r["decode_tok_s"]
        out["million"] = {"s": total, "peak_gb": r["peak_rss_mb"] / 1024, "target": "< 1800 s, < 16 GB",
                          "met": total < 1800 and r["peak_rss_mb"] < 16384}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="*", default=["tiny", "small"])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), metavar="TOKENS")
    p.add_argument("--million", action=argparse.BooleanOptionalAction, default=True,
                   help="also prefill + decode 1M tokens with tiny (~30 min)")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=16, help="decode tokens after each prefill")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast) | bf16 | fp32")
    add_run_args(p)
    p.set_defaults(timeout=3600)
    opts = p.parse_args()
    if opts.impl:
        print(json.dumps(child(opts)), flush=True)
    else:
        emit(parent(opts), opts.json)


if __name__ == "__main__":
    main()
