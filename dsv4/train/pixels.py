"""Training the pixel tokenizer (`dsv4.tokenizers.pixels`) from scratch on the procedural shapes and the MNIST-5k
training digits, as images and as clips, then its reconstruction report on held-out ones (issue 22).

    OUT/pixels.safetensors + OUT/pixels.json     the tokenizer (weights, PixelArgs)
    OUT/report.json                              PSNR, SSIM and code usage per kind of held-out sample
    OUT/reconstructions.png                      originals above their reconstructions, per kind
A step is a batch of images or, every `clip_every`-th step, a batch of clips (1 + 2 t frames); the loss is the mean
squared error in [-1, 1]. With a time budget the steps are fixed after the warm-up from the measured step time, so
the cosine decay ends on time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv4.atomic import atomic_dir, atomic_path, atomic_text
from dsv4.data.multimodal import VISUAL_KINDS, CaptionedSampler
from dsv4.tokenizers.pixels import PixelArgs, PixelTokenizer, psnr, save_pixels, ssim, to_uint8, to_unit

KINDS = VISUAL_KINDS


@dataclass
class PixelTrainConfig:
    out: str = "runs/multimodal/pixels"
    steps: int = 1500                 # fixed unless a time budget sizes them
    time_budget: float | None = None  # seconds for the whole training
    batch: int = 32                   # images per image step
    clip_batch: int = 4               # clips per clip step
    clip_every: int = 4               # every N-th step is a clip step
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    width: int = 32
    keyframes: bool = True            # PixelArgs.keyframes: later steps code their last frame as an image
    held_out: int = 64                # held-out samples per kind in the report


class PixelData(CaptionedSampler):
    """The tokenizer's training and held-out pixels (captions unused)."""

    def __init__(self, args: PixelArgs, digit_split: str):
        super().__init__(args.size, 1 + 2 * args.temporal, digit_split)

    def batch(self, kinds: tuple[str, ...], n: int, g: torch.Generator) -> torch.Tensor:
        """[n, F, 3, H, W] in [-1, 1], kinds taken in turn."""
        return to_unit(torch.stack([self.sample(kinds[i % len(kinds)], g)[2] for i in range(n)]))


def code_usage(ids: torch.Tensor, codebook: int) -> dict:
    """How much of the codebook a set of ids uses: the share of codes seen and the perplexity of their frequencies."""
    counts = torch.bincount(ids.flatten(), minlength=codebook).float()
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "share_used": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum()))}


@torch.no_grad()
def reconstruction_report(tok: PixelTokenizer, held_out: dict[str, torch.Tensor]) -> dict:
    """Per kind of held-out sample ([n, F, 3, H, W] in [-1, 1]): PSNR and SSIM over all frames, code usage."""
    tok.eval()
    report = {}
    for kind, x in held_out.items():
        ids = tok.encode(x)
        y = tok.decode(ids)
        report[kind] = {"samples": x.shape[0], "frames": x.shape[1], "psnr_db": round(psnr(y, x), 3),
                        "ssim": round(ssim(y.flatten(0, 1), x.flatten(0, 1)), 4),
                        **code_usage(ids, tok.fsq.codebook_size)}
    return report


def reconstruction_png(tok: PixelTokenizer, held_out: dict[str, torch.Tensor], path: Path, n: int = 8) -> None:
    """Rows of originals above their reconstructions, per kind (clips: every frame of the first sample)."""
    from PIL import Image

    rows = []
    with torch.no_grad():
        for x in held_out.values():
            x = x[:n] if x.shape[1] == 1 else x[:1].transpose(0, 1)  # a clip's frames side by side
            y = tok(x if x.shape[1] == 1 else x.transpose(0, 1)).reshape(x.shape)
            for t in (x, y):
                rows.append(torch.cat(list(to_uint8(t[:, 0])), 1))  # [H, n W, 3]
    width = max(r.shape[1] for r in rows)
    grid = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows], 0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.numpy()).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(tmp,
                                                                                                       format="PNG")


def budget_steps(step: int, elapsed: float, budget: float) -> int:
    """The step count that ends `budget` seconds in (95%, at the pace so far), revised as the run goes: after the
    warm-up and at every eighth of the run, so that a machine that slows down (another job, thermal limits) still
    ends on time. Never fewer than one more step; the cosine schedule follows the revised count."""
    return max(step + 1, int(budget * 0.95 * step / max(elapsed, 1e-9)))


def train_pixels(cfg: PixelTrainConfig, progress: bool = True) -> dict:
    """Train, save and report (see the module docstring) -> the report."""
    started, out = time.monotonic(), Path(cfg.out)
    torch.manual_seed(cfg.seed)
    args = PixelArgs(width=cfg.width, keyframes=cfg.keyframes)
    tok, data = PixelTokenizer(args), PixelData(args, "train")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.steps
    bar = tqdm(total=steps, desc="pixel tokenizer", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    while step < steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (
            0.5 * (1 + math.cos(math.pi * max(0, step - cfg.warmup) / max(1, steps - cfg.warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        clips = step % cfg.clip_every == cfg.clip_every - 1
        x = data.batch(KINDS[2:] if clips else KINDS[:2], cfg.clip_batch if clips else cfg.batch, g)
        loss = (tok(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if cfg.time_budget and (step == cfg.warmup or step % max(1, steps // 8) == 0):
            steps = budget_steps(step, time.monotonic() - started, cfg.time_budget)
            bar.total = steps
        bar.set_postfix_str(f"mse {loss.item():.4f}")
        bar.update(1)
    bar.close()
    held_g, val = torch.Generator().manual_seed(1234), PixelData(args, "held_out")
    held_out = {kind: val.batch((kind,), cfg.held_out if "clips" not in kind else cfg.held_out // 4, held_g)
                for kind in KINDS}
    report = {"config": asdict(cfg), "steps": step, "seconds": round(time.monotonic() - started, 1),
              "parameters": sum(p.numel() for p in tok.parameters()), "codebook": tok.fsq.codebook_size,
              "reconstruction": reconstruction_report(tok, held_out)}
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        save_pixels(tok, tmp)
        reconstruction_png(tok, held_out, tmp / "reconstructions.png")
        atomic_text(tmp / "report.json", json.dumps(report, indent=1))
    return report
