"""Needle in a haystack: pass-key retrieval accuracy over context lengths and needle depths, as JSON and a heat map.

For every (length, depth) cell, `samples` pass-key prompts (dsv4.data.tasks: the key sentence at that depth of a
haystack of held-out text, the question at the end) are continued greedily by the inference engine; a sample counts as
retrieved when the first number of the continuation is the key (so " 48213." counts, " 482139" does not). Prompts
run one at a time through one engine whose cache holds the longest length (the prefill is the engine's chunked,
bounded-memory path).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dsv4.atomic import atomic_path

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle_in_a_haystack(model, tok, filler: np.ndarray, lengths: Sequence[int] = LENGTHS,
                         depths: Sequence[float] = DEPTHS, samples: int = 2, seed: int = 0,
                         progress: Callable[[dict], None] | None = None) -> dict:
    """Accuracy per (length, depth) -> {"lengths", "depths", "samples", "seed", "accuracy": [[per depth] per length],
    "by_length": [...], "results": [one dict per prompt]}. progress(result) after each prompt."""
    from dsv4.data.tasks import TaskGenerator
    from dsv4.engine import Engine, SamplingParams

    gen = TaskGenerator(tok, filler, seed=seed)
    longest = max(lengths)
    engine = Engine(model, tok, max_batch=1, max_len=min(longest + 16, model.args.max_seq_len))
    results = []
    for L in lengths:
        for d in depths:
            for _ in range(samples):
                s = gen.sample("passkey", min(L, engine.max_len - 16), depth=d)
                prompt = s.ids[: s.prompt_len]
                answer = s.ids[s.prompt_len:]
                t0 = time.perf_counter()
                out = engine.generate([prompt], SamplingParams(temperature=0), max_new_tokens=len(answer),
                                      ignore_eos=True)[0]
                key = s.answers[0]
                r = {"length": len(s.ids), "depth": d, "key": key, "output": tok.decode(out.token_ids),
                     "correct": retrieved(tok.decode(out.token_ids), key), "seconds": time.perf_counter() - t0}
                results.append(r)
                if progress is not None:
                    progress(r)
    acc = [[float(np.mean([r["correct"] for r in results[(i * len(depths) + j) * samples:
                                                           (i * len(depths) + j + 1) * samples]]))
            for j in range(len(depths))] for i in range(len(lengths))]
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed, "accuracy": acc,
            "by_length": [float(np.mean(row)) for row in acc], "results": results}


def retrieved(output: str, key: str) -> bool:
    """Whether the continuation states the key: its first number, right at the start, is exactly the key."""
    m = re.match(r"\s*(\d+)", output)
    return m is not None and m.group(1) == key


def plot_niah(report: dict, path: str | os.PathLike, title: str = "needle in a haystack (pass key)") -> str:
    """A heat map of the accuracy: context length across, needle depth down, the accuracy in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(report["accuracy"]).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(1.1 * len(report["lengths"]) + 2, 0.55 * len(report["depths"]) + 1.6))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(report["lengths"])), [_tokens(n) for n in report["lengths"]])
    ax.set_yticks(range(len(report["depths"])), [f"{d:.0%}" for d in report["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title}, {report['samples']} per cell")
    fig.colorbar(im, ax=ax, label="retrieved")
    path = str(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """niah.json and niah.png in out_dir (written atomically)."""
    from dsv4.atomic import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "niah.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    return out / "niah.json", Path(plot_niah(report, out / "niah.png"))


def _tokens(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)
