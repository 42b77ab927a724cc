"""Decoding speed: dsv4's inference engine vs transformers' `generate`, same config and weights, after a long prompt;
the engine's cache size against the theory; memory-bandwidth utilisation at batch 1; MTP speculation on a trained model.

    python bench/decode.py                                   # small preset, batch 1 and 16 after a 2048-token prompt
    python bench/decode.py --batch 1 --new-tokens 16 --quick --ours-only
    python bench/decode.py --mtp-ckpt runs/small/final       # + MTP acceptance / speed-up on a trained model
    python bench/decode.py --batch --mtp-ckpt runs/small/final   # only that

Both sides greedy-decode `new_tokens` tokens for `batch` random prompts of `prompt` tokens in the compute dtype
(bf16 where fast), each in its own subprocess:
    dsv4           `Engine(compile=True)` (preallocated cache, batched decode steps through torch.compile; the
                   run is repeated and the second one timed, so compilation is not counted); decode tokens/s =
                   tokens generated after each request's first / time from the end of prefill to the end
    transformers   `DeepseekV4ForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)` after a warm-up
                   call; a LogitsProcessor stamps the time each token's logits are ready, decode tokens/s =
                   batch * (n-1) / (last stamp - first stamp)
Bandwidth utilisation = (bytes of the weights one decode step reads: every non-expert matrix, the shared expert, the
routed experts its tokens choose (K at batch 1, the expected number under uniform routing at batch B), the head; +
bytes of cache it reads: window, compressed entries, indexer keys) / the median decode step time, against this
machine's read bandwidth (a large tensor sum, best of 5). step_floor_s = those bytes / that bandwidth: no
implementation's step can be faster, so speedup_ceiling = transformers' step / floor bounds any speed-up here.
Prints one JSON document.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# bench/ is on sys.path when these run as scripts
from common import add_run_args, emit, run_script_child, save_shared_checkpoint, watchdog  # noqa: E402


def read_bandwidth() -> float:
    """Bytes/s of summing a 512 MiB bf16 tensor (best of 5)."""
    import torch

    x = torch.ones(256 * 2 ** 20, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 2 / best


def bytes_per_decode_step(args, dtype_size: int, context: int, batch: int = 1) -> dict:
    """Weights and cache one decode step of `batch` sequences at `context` reads, from the meta model's parameter
    shapes. Each sequence picks K of E routed experts per layer; with uniform routing a step touches
    E (1 - (1 - K/E)^batch) of them (K at batch 1, nearly all at batch 16)."""
    from dsv4.weights.info import count_params, meta_model

    parts = count_params(meta_model(args))
    main = parts["main"]
    routed = main["routed_experts"]
    touched = 1 - (1 - args.n_activated_experts / args.n_routed_experts) ** batch
    active = sum(v.active for v in main.values()) - main["embedding"].active - routed.active
    weights = (active + routed.total * touched + batch * args.dim) * dtype_size  # + the embedding rows
    cache = 0
    for i in range(args.n_layers):
        kind, m = args.layer_kind(i), args.compress_ratios[i]
        cache += min(args.window_size, context) * args.head_dim
        if kind == "hca":
            cache += context // m * args.head_dim
        elif kind == "csa":
            cache += context // m * args.index_head_dim + min(args.index_topk, context // m) * args.head_dim
    return {"weights": round(weights), "cache": batch * cache * dtype_size}


def child(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype, tune_cpu_allocator

    watchdog(opts.limit_kb)
    tune_cpu_allocator()
    dtype = resolve_dtype(opts.dtype)
    B, P, N = opts.batch, opts.prompt, opts.new_tokens
    g = torch.Generator().manual_seed(opts.seed)
    if opts.impl == "ours":
        import dsv4
        from dsv4.engine import Engine, SamplingParams
        from dsv4.tokenizers.text import IdsOnly, Tokenizer

        model = dsv4.from_pretrained(opts.ckpt, device="cpu", dtype=dtype).eval()
        tok_path = os.path.join(opts.ckpt, "tokenizer.json")
        tok = Tokenizer.from_file(tok_path) if os.path.exists(tok_path) else IdsOnly()  # (the shared checkpoint)
        prompts = [torch.randint(0, model.args.vocab_size, (P,), generator=g).tolist() for _ in range(B)]
        if opts.mtp_child:  # real text for a trained model: its held-out files, cut into prompts
            prompts = text_prompts(tok, B, P)
        results = {}
        for spec in ([False, True] if opts.mtp_child else [False]):
            engine = Engine(model, tok, max_batch=B, max_len=P + N + 1, prefill_chunk=P, speculative=spec,
                            compile={"off": False, "on": True, "max": "max"}[opts.compile])
            for _ in range(2):  # the first round compiles and warms up allocator and kernels; the second is timed
                engine.stats.update(drafted=0, accepted=0)
                for p in prompts:
                    engine.submit(p, SamplingParams(temperature=0), max_new_tokens=N, ignore_eos=True)
                t0 = time.perf_counter()
                while any(r.prefilling for r in engine.running) or engine.waiting:
                    engine.step()
                t1 = time.perf_counter()
                n0, steps = engine.stats["decode_tokens"], []
                while engine.has_work():
                    s = time.perf_counter()
                    engine.step()
                    steps.append(time.perf_counter() - s)
                t2 = time.perf_counter()
            made = engine.stats["decode_tokens"] - n0
            key = "speculative" if spec else "plain"
            results[key] = {"decode_tok_s": made / (t2 - t1), "prefill_s": t1 - t0,
                            "median_step_s": statistics.median(steps), "cache_nbytes": engine.cache.nbytes(),
                            "cache_bytes_per_token": engine.cache.bytes_per_token()}
            if spec:
                s = engine.stats
                results[key]["acceptance"] = s["accepted"] / max(s["drafted"], 1)
        return results if opts.mtp_child else results["plain"]
    import transformers

    model = transformers.DeepseekV4ForCausalLM.from_pretrained(opts.ckpt, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=g)
    stamps = []

    class Clock(transformers.LogitsProcessor):  # called once per generated token, when its logits are ready
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run(n) -> float:
        stamps.clear()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, logits_processor=[Clock()])
        return t
    run(2)  # warm-up
    t0 = run(N)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"decode_tok_s": B * len(steps) / (stamps[-1] - stamps[0]), "prefill_s": stamps[0] - t0,
            "median_step_s": statistics.median(steps)}


def text_prompts(tok, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens of real Python (the standard library, files in a fixed order)."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for f in sorted(stdlib.glob("*.py"))[::7]:
        ids += tok.encode(f.read_text(errors="replace"))
        if len(ids) >= batch * length:
            break
    return [ids[i * length: (i + 1) * length] for i in range(batch)]


def run_child(impl: str, ckpt: str, batch: int, opts, mtp: bool = False) -> dict:
    args = ["--child", impl, "--ckpt", ckpt, "--batch", str(batch), "--prompt", str(opts.prompt),
            "--new-tokens", str(opts.new_tokens), "--dtype", opts.dtype, "--seed", str(opts.seed),
            "--limit-kb", str(opts.limit_kb), "--compile", opts.compile] + ["--mtp-child"] * mtp
    return run_script_child(__file__, args, opts.timeout)


def parent(opts) -> dict:
    import torch

    from dsv4.device import resolve_dtype
    from dsv4.model.cache import bytes_per_token

    dtype = resolve_dtype(opts.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    bandwidth = read_bandwidth()
    results = {"preset": opts.preset, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "prompt": opts.prompt, "new_tokens": opts.new_tokens, "read_bandwidth_gb_s": bandwidth / 1e9,
               "runs": []}
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = save_shared_checkpoint(opts.preset, opts.seed, tmp)
        theory = bytes_per_token(args, dtype)
        for batch in opts.batch:
            row = {"batch": batch, "ours": run_child("ours", tmp, batch, opts)}
            print(f"batch {batch} ours: {row['ours']}", file=sys.stderr, flush=True)
            if not opts.ours_only:
                row["transformers"] = run_child("theirs", tmp, batch, opts)
                print(f"batch {batch} transformers: {row['transformers']}", file=sys.stderr, flush=True)
                if "decode_tok_s" in row["ours"] and "decode_tok_s" in row["transformers"]:
                    row["speedup"] = row["ours"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
            ours = row["ours"]
            if "cache_bytes_per_token" in ours:
                row["cache_bytes_per_token"] = {"engine": ours["cache_bytes_per_token"], "theory": theory,
                                                "ratio": ours["cache_bytes_per_token"] / theory}
            if "median_step_s" in ours:
                read = bytes_per_decode_step(args, size, opts.prompt + opts.new_tokens // 2, batch)
                row["bytes_read_per_step"] = read
                row["bandwidth_utilisation"] = sum(read.values()) / ours["median_step_s"] / bandwidth
                # no step can beat reading its bytes once at the measured bandwidth: the best any speed-up could be
                floor = sum(read.values()) / bandwidth
                row["step_floor_s"] = floor
                if "median_step_s" in row.get("transformers", {}):
                    row["speedup_ceiling"] = row["transformers"]["median_step_s"] / floor
            results["runs"].append(row)
    if opts.mtp_ckpt:  # at the length the model was trained at, continuing real code
        r = run_child("ours", opts.mtp_ckpt, 1, argparse.Namespace(**{**vars(opts), "prompt": opts.mtp_prompt,
                                                                      "new_tokens": opts.mtp_new_tokens}), mtp=True)
        if "speculative" in r:
            r["speedup"] = r["speculative"]["decode_tok_s"] / r["plain"]["decode_tok_s"]
        results["mtp"] = {"ckpt": opts.mtp_ckpt, "prompt": opts.mtp_prompt, "new_tokens": opts.mtp_new_tokens, **r}
        print(f"MTP: {r}", file=sys.stderr, flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 16], help="batch sizes (none: only the MTP run)")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast) | bf16 | fp32")
    p.add_argument("--compile", default="on", choices=("off", "on", "max"),
                   help="dsv4 decode steps through torch.compile: Engine(compile=False | True | 'max')")
    p.add_argument("--mtp-ckpt", help="a trained checkpoint with an MTP module: report acceptance and speed-up")
    p.add_argument("--mtp-prompt", type=int, default=256, help="prompt tokens for the MTP run")
    p.add_argument("--mtp-new-tokens", type=int, default=128, help="tokens generated in the MTP run")
    p.add_argument("--mtp-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run: short prompt, few tokens")
    add_run_args(p)
    opts = p.parse_args()
    if opts.quick:
        opts.prompt, opts.new_tokens = min(opts.prompt, 256), min(opts.new_tokens, 8)
    if opts.impl:
        opts.batch = opts.batch[0]
        print(json.dumps(child(opts)), flush=True)
    else:
        emit(parent(opts), opts.json)


if __name__ == "__main__":
    main()
