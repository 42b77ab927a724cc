"""What a checkpoint's Engram memory reads for a text (`dsv4 engram`): token ids, their compressed ids, and per layer
the row of every (order, head) table at every position, from the config, the tokenizer and the stored compression
alone (no weights are loaded)."""

from __future__ import annotations

import json
import os

import torch

from dsv4.model.engram import engram_hashes
from dsv4.weights.checkpoint import read_config
from dsv4.weights.tensors import read_tensor


def engram_report(ckpt: str | os.PathLike, text: str) -> dict:
    """The rows `text` reads, as `dsv4 engram --json` prints them (rows within each head's table, before offsets)."""
    from dsv4.tokenizers.text import Tokenizer

    args, _ = read_config(ckpt)
    if not args.engram:
        raise ValueError(f"{os.fspath(ckpt)} has no Engram memory (train one with dsv4 train --engram)")
    tok_path = os.path.join(os.fspath(ckpt), "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{os.fspath(ckpt)} has no tokenizer.json")
    ids = Tokenizer.from_file(tok_path).encode(text)
    if not ids:
        raise ValueError("the text has no tokens")
    lookup = read_tensor(ckpt, "engram_ids").long()
    cids = lookup[torch.tensor(ids)]
    pad = int(lookup[args.engram_pad_id])
    hashes = engram_hashes(args)
    return {
        "token_ids": ids, "compressed_ids": cids.tolist(), "compressed_vocab_size": args.compressed_vocab,
        "pad_id": pad, "seed": args.engram_seed, "max_ngram": args.engram_max_ngram, "heads": args.engram_heads,
        "vocab_per_ngram": args.engram_vocab, "layers": args.engram_layers,
        "table_sizes": {str(layer): h.primes for layer, h in hashes.items()},
        "rows": {str(layer): h.rows(cids[None], pad, offset=False)[0].tolist() for layer, h in hashes.items()},
    }


def format_engram(report: dict, tokens: list[str]) -> str:
    """A readable table: one line per position (token, id, compressed id, rows per layer and order)."""
    orders, heads = report["max_ngram"] - 1, report["heads"]
    lines = [f"compressed vocabulary {report['compressed_vocab_size']}, pad {report['pad_id']}, seed {report['seed']}, "
             f"orders 2..{report['max_ngram']} x {heads} heads, layers {report['layers']}"]
    for layer, sizes in report["table_sizes"].items():
        lines.append(f"layer {layer} table sizes: " + "; ".join(
            f"{n + 2}-gram {', '.join(map(str, p))}" for n, p in enumerate(sizes)))
    header = f"{'pos':>4} {'token':<16}{'id':>7}{'cid':>7}  " + "  ".join(
        f"L{layer} {n + 2}-gram rows" for layer in report["rows"] for n in range(orders))
    lines += ["", header]
    for i, (tid, cid) in enumerate(zip(report["token_ids"], report["compressed_ids"])):
        cells = [" ".join(str(r) for r in rows[i][n * heads:(n + 1) * heads])
                 for rows in report["rows"].values() for n in range(orders)]
        lines.append(f"{i:>4} {json.dumps(tokens[i])[:16]:<16}{tid:>7}{cid:>7}  " + "  ".join(cells))
    return "\n".join(lines)
