"""Serving throughput: `dsv4 serve` under 1, 4, 16 and 32 concurrent streaming clients.

    python bench/serve.py                                  # runs/small/final (what `make run` trains)
    python bench/serve.py --ckpt DIR --clients 1 16 --compile

The server runs as its own process on loopback with as many cache slots as the most clients. Each client sends
`--requests` streaming /v1/completions requests one after another (greedy, `--max-tokens` each, prompts of real
Python from the standard library, a different one per request); all clients start together. Reported per level:
total output tokens/s (completion tokens from the responses' usage / wall time of the level), p50 and p99 time to
first token (request sent -> first text chunk), and the speed-up over one client. Prints one JSON document.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

from tests.serve_util import Server  # noqa: E402


def prompts(tok, n: int, length: int) -> list[str]:
    from decode import text_prompts  # bench/ is on sys.path as a script

    return [tok.decode(ids) for ids in text_prompts(tok, n, length)]


async def client(url: str, texts: list[str], max_tokens: int) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for text in texts:
            r = await streamed(http, text, max_tokens, ignore_eos=False)
            out.append({"ttft": r["ttft_s"], "tokens": r["usage"]["completion_tokens"] if r["usage"] else 0})
    return out


async def level(url: str, n: int, texts: list[str], requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    done = await asyncio.gather(*(client(url, texts[i * requests:(i + 1) * requests], max_tokens)
                                  for i in range(n)))
    wall = time.perf_counter() - t0
    rows = [r for c in done for r in c]
    ttft = sorted(r["ttft"] for r in rows)
    return {"clients": n, "requests": len(rows), "output_tokens": sum(r["tokens"] for r in rows), "wall_s": wall,
            "output_tok_s": sum(r["tokens"] for r in rows) / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}


async def streamed(http: httpx.AsyncClient, text: str, max_tokens: int, stamps: list[float] | None = None,
                   ignore_eos: bool = True) -> dict:
    """One greedy streaming completion -> its time to first token and usage (and, into `stamps`, the arrival time of
    every text chunk)."""
    body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                if stamps is not None:
                    stamps.append(now)
            usage = chunk.get("usage") or usage
    return {"ttft_s": (first or time.perf_counter()) - t0, "end": time.perf_counter(), "usage": usage}


async def prefix_ttft(url: str, tok, tokens: int, pairs: int) -> dict:
    """Time to first token of a prompt that extends one just served (its answer + a new message: a chat's next turn)
    against a brand-new prompt of the same length, `pairs` times (different texts) -> medians and their ratio."""
    texts = prompts(tok, 3 * pairs, tokens)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        for i in range(pairs):
            first = await streamed(http, texts[3 * i], 16)
            answer = (await http.post("/v1/completions", json={"model": "bench", "prompt": texts[3 * i],
                                                                 "max_tokens": 16, "temperature": 0})).json()
            follow_up = texts[3 * i] + answer["choices"][0]["text"] + tok.decode(tok.encode(texts[3 * i + 1])[:64])
            n = len(tok.encode(follow_up))
            new = tok.decode(tok.encode(texts[3 * i + 2] + texts[3 * i + 1])[:n])
            extended, fresh = await streamed(http, follow_up, 1), await streamed(http, new, 1)
            rows.append({"first_ttft_s": first["ttft_s"], "extended_ttft_s": extended["ttft_s"],
                         "new_ttft_s": fresh["ttft_s"], "prompt_tokens": n,
                         "cached_tokens": extended["usage"].get("prompt_tokens_details", {}).get("cached_tokens")})
    ext, new = (statistics.median(r[k] for r in rows) for k in ("extended_ttft_s", "new_ttft_s"))
    return {"tokens": tokens, "pairs": rows, "extended_ttft_s": ext, "new_ttft_s": new, "ratio": ext / new}


async def stream_pause(url: str, tok, long_tokens: int, rounds: int) -> dict:
    """A stream is running when a `long_tokens` prompt arrives: the longest gap between the stream's chunks while
    that prompt prefills (until its first token), against its prefill time (its time to first token), per round."""
    texts = prompts(tok, rounds + 1, long_tokens)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        for i in range(rounds):
            stamps: list[float] = []
            running = asyncio.create_task(streamed(http, texts[-1][:2000], 4000, stamps))
            while len(stamps) < 8:  # streaming steadily
                if running.done():
                    running.result()  # (raises what ended it)
                    raise RuntimeError("the running stream ended before the long prompt came")
                await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            long = await streamed(http, texts[i], 1)
            t1 = t0 + long["ttft_s"]
            running.cancel()
            during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
            before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= t0]
            rows.append({"prefill_s": long["ttft_s"], "longest_pause_s": max(during, default=None),
                         "median_gap_before_s": statistics.median(before), "chunks_during": len(during),
                         "ratio": max(during, default=float("nan")) / long["ttft_s"]})
    return {"tokens": long_tokens, "rounds": rows, "ratio": statistics.median(r["ratio"] for r in rows)}


def scheduling(opts, tok, ckpt) -> dict:
    args = ["--max-batch", "2", "--model-name", "bench", "--dtype", "auto",
            "--compile" if opts.compile else "--no-compile",
            "--max-len", str(max(opts.long_tokens, opts.ttft_tokens) + 512)] + opts.server_args
    server = Server(ckpt, *args, api_key=None, startup_s=3600)
    try:
        asyncio.run(level(server.url, 1, prompts(tok, 1, 64), 1, 8))  # warm-up
        out = {"prefix_ttft": asyncio.run(prefix_ttft(server.url, tok, opts.ttft_tokens, opts.rounds))}
        print(f"extended vs new prompt TTFT: {out['prefix_ttft']['ratio']:.3f}x", file=sys.stderr, flush=True)
        out["pause"] = asyncio.run(stream_pause(server.url, tok, opts.long_tokens, opts.rounds))
        print(f"longest pause / prefill: {out['pause']['ratio']:.3f}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return {"ckpt": str(ckpt), "server_args": args, **out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/small/final", help="checkpoint with tokenizer.json")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="serve with --compile (the warm-up level compiles)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="pass --speculative / --no-speculative to the server (default: the server's own default)")
    p.add_argument("--scheduling", action="store_true", help="instead of the client levels: time to first token of "
                   "a prompt extending a served one vs a new one (--ttft-tokens), and the longest pause of a running "
                   "stream while a --long-tokens prompt prefills")
    p.add_argument("--ttft-tokens", type=int, default=6144)
    p.add_argument("--long-tokens", type=int, default=24576)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `dsv4 serve` options (last)")
    p.add_argument("--json", metavar="PATH", help="also write the report here (bench/results/NAME.json)")
    opts = p.parse_args()

    from dsv4.tokenizers.text import Tokenizer

    ckpt = Path(opts.ckpt)
    if not (ckpt / "tokenizer.json").exists():
        sys.exit(f"{ckpt} has no tokenizer.json: train one with `make run`, or pass --ckpt")
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    if opts.scheduling:
        return emit(scheduling(opts, tok, ckpt), opts.json)
    most = max(opts.clients)
    texts = prompts(tok, most * opts.requests, opts.prompt_tokens)
    args = ["--max-batch", str(most), "--model-name", "bench", "--dtype", "auto", "--max-len", "1024"] + \
        ["--compile" if opts.compile else "--no-compile"] + ([] if opts.speculative is None else
                                        ["--speculative" if opts.speculative else "--no-speculative"])
    server = Server(ckpt, *args, api_key=None, startup_s=3600)  # --compile compiles before it listens
    try:
        print("warming up", file=sys.stderr, flush=True)
        for n in sorted(set(opts.clients)):  # every batch size once (compiles, when compiled), untimed
            asyncio.run(level(server.url, n, texts, 1, 8))
        results = []
        for n in opts.clients:
            r = asyncio.run(level(server.url, n, texts, opts.requests, opts.max_tokens))
            print(f"{n} clients: {r['output_tok_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)
            results.append(r)
    finally:
        server.stop()
    base = next((r["output_tok_s"] for r in results if r["clients"] == 1), None)
    for r in results:
        r["speedup_vs_1_client"] = r["output_tok_s"] / base if base else None
    emit({"ckpt": str(ckpt), "compile": opts.compile, "speculative": opts.speculative, "max_tokens": opts.max_tokens,
          "prompt_tokens": opts.prompt_tokens, "requests_per_client": opts.requests, "levels": results}, opts.json)


if __name__ == "__main__":
    main()
