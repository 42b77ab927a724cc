"""PNG plots of a training run, drawn from its metrics JSONL (one JSON object per line, written by the trainer):
loss curves (train, val), the learning rate, and the routed experts' load per layer as a heat map.

Expected keys: "step"; "loss" (train), "val_loss", "lr"; "expert_load": {layer: [tokens per expert]} on the lines
that carry them. Missing keys just leave their plot out.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from dsv4.atomic import atomic_path  # noqa: E402


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                    continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: str):
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_run(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write loss.png, lr.png and expert_load.png (those that have data) into out_dir; return their paths."""
    rows = read_metrics(metrics_path)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []

    # the validation loss is the main model's cross-entropy: compare it with the same term of the training loss
    # (the total adds the MTP, balance and indexer terms)
    key = "ce" if any("ce" in r for r in rows) else "loss"
    steps, loss = _series(rows, key)
    vsteps, vloss = _series(rows, "val_loss")
    start = [r["val_loss_start"] for r in rows[:1] if "val_loss_start" in r]  # before the first step
    vsteps, vloss = [0] * len(start) + vsteps, start + vloss
    if steps or vsteps:
        fig, ax = plt.subplots(figsize=(7, 4))
        if steps:
            ax.plot(steps, loss, label="train CE" if key == "ce" else "train", lw=1)
        if vsteps:
            ax.plot(vsteps, vloss, "o-", label="validation CE", ms=3)
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(os.path.join(out_dir, "loss.png"))
        _save(fig, written[-1])

    steps, lr = _series(rows, "lr")
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(steps, lr, lw=1)
        ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
        ax.grid(alpha=0.3)
        written.append(os.path.join(out_dir, "lr.png"))
        _save(fig, written[-1])

    loads = [r for r in rows if r.get("expert_load")]
    if loads:
        last = loads[-1]["expert_load"]
        layers = sorted(last, key=int)
        grid = [[v / max(sum(last[k]) / len(last[k]), 1e-9) for v in last[k]] for k in layers]  # load / mean load
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(layers) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=f"expert load / mean at step {loads[-1]['step']}",
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax)
        written.append(os.path.join(out_dir, "expert_load.png"))
        _save(fig, written[-1])
    return written


def plot_expert_load(load: dict, path: str | os.PathLike) -> str:
    """Expert load per modality (`dsv4.train.modality.expert_load_by_modality`): one heat map per MoE layer, a row
    per modality, a column per expert, the share of that modality's routed assignments; the layer's title gives each
    modality's total variation distance from text's."""
    import numpy as np

    layers = list(load["share"])
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 1.5 * len(layers)), squeeze=False,
                             layout="constrained")
    for ax, layer in zip(axes[:, 0], layers):
        mods = list(load["share"][layer])
        grid = np.array([load["share"][layer][m] for m in mods])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(mods)), mods)
        tv = load["tv_from_text"].get(layer, {})
        ax.set_title(f"{layer}  (TV from text: " + ", ".join(f"{m} {v:.2f}" for m, v in tv.items()) + ")", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
        ax.set_xticks(range(grid.shape[1]))
    axes[-1, 0].set_xlabel("routed expert")
    fig.suptitle("expert load per modality (share of each modality's assignments)")
    _save(fig, os.fspath(path))
    return os.fspath(path)
