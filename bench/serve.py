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
            body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0, first, tokens = time.perf_counter(), None, 0
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            out.append({"ttft": (first or time.perf_counter()) - t0, "tokens": tokens})
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
    p.add_argument("--json", metavar="PATH", help="also write the report here (bench/results/NAME.json)")
    opts = p.parse_args()

    from dsv4.tokenizers.text import Tokenizer

    ckpt = Path(opts.ckpt)
    if not (ckpt / "tokenizer.json").exists():
        sys.exit(f"{ckpt} has no tokenizer.json: train one with `make run`, or pass --ckpt")
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    most = max(opts.clients)
    texts = prompts(tok, most * opts.requests, opts.prompt_tokens)
    args = ["--max-batch", str(most), "--model-name", "bench", "--dtype", "auto", "--max-len", "1024"] + \
        ["--compile"] * opts.compile + ([] if opts.speculative is None else
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
