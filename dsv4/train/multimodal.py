"""The multimodal run (issue 22): one V4 model that reads and writes text, images and clips in one vocabulary.

    OUT/pixels/               the pixel tokenizer (`dsv4.train.pixels`), trained first; reused when present
    OUT/tokenizer.json        the byte-level BPE of the text pipeline; OUT/data/ its token files
    OUT/items/                the captioned training images and clips, drawn once and tokenized by the pixel
                              tokenizer (codes.safetensors + captions.json)
    OUT/pretrain/             the Trainer's snapshots and metrics, on `dsv4.data.multimodal.MultimodalMix` rows
    OUT/final/                checkpoint (vocabulary = text + BOF + codes) + tokenizer.json + pixels/ + multimodal.json
With a time budget, the pixel tokenizer gets `pixel_share` of it and the model the rest (its steps measured as
`dsv4 train` measures them).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dsv4.atomic import atomic_dir, atomic_text
from dsv4.config import ModelArgs
from dsv4.data.multimodal import DEFAULT_MIX, CaptionedSampler, MultimodalMix, VisualItem, Weights
from dsv4.tokenizers.pixels import load_pixels
from dsv4.train.autodtype import training_dtype
from dsv4.train.budget import StepBudget
from dsv4.train.config import StageConfig, TrainConfig
from dsv4.train.pipeline import build_model, prepare_data
from dsv4.train.pixels import PixelTrainConfig, train_pixels
from dsv4.train.trainer import Trainer


@dataclass
class MultimodalConfig:
    out: str = "runs/multimodal"
    preset: str = "v4-2m"             # its vocabulary becomes the text part of the joint one
    data: str | None = None           # the text corpus (as `dsv4 train --data`): None = the standard library
    val_frac: float = 0.03
    time_budget: float | None = None  # seconds for the whole run
    pixel_share: float = 0.2          # of the time budget, for the pixel tokenizer
    pixels: PixelTrainConfig = field(default_factory=PixelTrainConfig)
    images: int = 4000                # captioned training images (half shapes, half digits)
    clips: int = 1000                 # captioned training clips (half shapes, half digits)
    stage: StageConfig = field(default_factory=lambda: StageConfig(steps=600, batch_size=16, seq_len=256))
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    drop_caption: float = 0.1
    text_weight: float = 1.0
    visual_weight: float = 1.0
    device: str | None = None         # None = the accelerator if any, else the CPU
    dtype: str = "auto"
    seed: int = 0


def draw_items(n_images: int, n_clips: int, frames: int, seed: int) -> tuple[list, list]:
    """(images, clips) as (caption, motion words or None, uint8 pixels [F, H, W, 3]), half shapes, half training
    digits each."""
    g, sampler = torch.Generator().manual_seed(seed), CaptionedSampler(32, frames, "train")
    images = [sampler.sample(("shapes", "digits")[i % 2], g) for i in range(n_images)]
    clips = [sampler.sample(("shape clips", "digit clips")[i % 2], g) for i in range(n_clips)]
    return images, clips


def tokenize_items(pixel_tok, drawn: list, batch: int = 64) -> list[VisualItem]:
    from dsv4.tokenizers.pixels import to_unit

    items = []
    for i in range(0, len(drawn), batch):
        chunk = drawn[i:i + batch]
        codes = pixel_tok.encode(to_unit(torch.stack([px for _, _, px in chunk]))).flatten(2)  # [n, T, h w]
        items += [VisualItem(cap, c, motion) for (cap, motion, _), c in zip(chunk, codes)]
    return items


def save_items(items: dict[str, list[VisualItem]], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: torch.stack([it.codes for it in v]) for k, v in items.items()}, f"{tmp}/codes.safetensors")
        Path(tmp, "captions.json").write_text(json.dumps({k: [[it.caption, it.motion] for it in v]
                                                          for k, v in items.items()}))


def load_items(path: Path) -> dict[str, list[VisualItem]]:
    from safetensors.torch import load_file

    codes, captions = load_file(path / "codes.safetensors"), json.loads((path / "captions.json").read_text())
    return {k: [VisualItem(c, x, m) for (c, m), x in zip(captions[k], codes[k])] for k in captions}


def prepare(cfg: MultimodalConfig, out: Path, device: torch.device, progress: bool):
    """The pixel tokenizer, the text tokenizer and token files, the tokenized items (each made once, then reused)
    -> (text tokenizer, joint vocabulary, the row mix)."""
    from dsv4.data.corpus import load_tokens
    from dsv4.tokenizers.multimodal import VisualVocab

    if not (out / "pixels" / "pixels.json").exists():
        budget = cfg.time_budget * cfg.pixel_share if cfg.time_budget else None
        train_pixels(replace(cfg.pixels, out=str(out / "pixels"), seed=cfg.seed, time_budget=budget,
                             steps=10**9 if budget else cfg.pixels.steps), progress)
    pixel_tok = load_pixels(out / "pixels", device)
    text_cfg = TrainConfig(out=str(out), data=cfg.data, val_frac=cfg.val_frac)
    tok, _, _, train_file, _ = prepare_data(text_cfg, out, ModelArgs.from_name(cfg.preset).vocab_size, progress)
    if not (out / "items" / "captions.json").exists():
        images, clips = draw_items(cfg.images, cfg.clips, 1 + 2 * pixel_tok.args.temporal, cfg.seed)
        save_items({"images": tokenize_items(pixel_tok, images), "clips": tokenize_items(pixel_tok, clips)},
                   out / "items")
    items = load_items(out / "items")
    vocab = VisualVocab.build(tok, pixel_tok.fsq.codebook_size, pixel_tok.args.grid ** 2)
    text = torch.from_numpy(load_tokens(train_file).astype("int64"))
    mix = MultimodalMix(tok, vocab, text, items["images"], items["clips"], cfg.stage.seq_len, mix=cfg.mix,
                        drop_caption=cfg.drop_caption, weights=Weights(cfg.text_weight, cfg.visual_weight))
    return tok, vocab, mix


def run_multimodal(cfg: MultimodalConfig, progress: bool = True) -> Path:
    """Run (or continue, or reuse the parts of) the whole multimodal pipeline -> OUT/final."""
    from dsv4.device import default_device
    from dsv4.train.snapshot import load_latest
    from dsv4.weights.checkpoint import save_pretrained

    started, out = time.monotonic(), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device) if cfg.device else default_device()
    tok, vocab, mix = prepare(cfg, out, device, progress)
    args, stage = ModelArgs.from_name(cfg.preset, vocab_size=vocab.size), cfg.stage
    dtype = training_dtype(cfg.dtype, device, lambda: build_model(args, device, cfg.seed), stage, out / "dtype.json",
                           budgeted=bool(cfg.time_budget), progress=progress)
    val = [next(mix.batches(stage.batch_size, seed=cfg.seed + 1, start_step=i)) for i in range(stage.eval_batches)]
    trainer = Trainer(build_model(args, device, cfg.seed), stage, out / "pretrain",
                      lambda start: mix.batches(stage.batch_size, cfg.seed, start), val, dtype,
                      meta={"multimodal": asdict(cfg)}, progress=progress, desc="multimodal")
    trainer.resume()
    budget = StepBudget(deadline=started + cfg.time_budget, path=out / "pretrain" / "budget.json",
                        tokens_per_step=stage.tokens_per_step, schedule=stage.schedule,
                        warmup=stage.warmup) if cfg.time_budget else None
    trainer.fit(budget)
    model = build_model(args, device, cfg.seed)  # the final weights at full precision, then the compute dtype
    model.load_state_dict(load_latest(out / "pretrain")["model"])
    model.to_dtype(dtype)
    report = {"val_ce_by_task": task_losses(model, mix, cfg.seed + 2, device)}
    with atomic_dir(out / "final") as tmp:
        save_pretrained(model, tmp)
        tok.save(Path(tmp) / "tokenizer.json")
        shutil.copytree(out / "pixels", Path(tmp) / "pixels")
        atomic_text(Path(tmp) / "multimodal.json", json.dumps(asdict(vocab), indent=1))
        atomic_text(Path(tmp) / "report.json", json.dumps(report, indent=1))
    if progress:
        losses = report["val_ce_by_task"]
        print("multimodal: validation CE by task " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
    return out / "final"


@torch.no_grad()
def task_losses(model, mix: MultimodalMix, seed: int, device: torch.device, rows_per_task: int = 8) -> dict:
    """Mean weighted CE (nats per counted target) of each task's rows, drawn from a seed training never uses; the
    row weights as training counts them (image->video: the generated steps only)."""
    from dsv4.train.loss import cross_entropy

    model.eval()
    by_task: dict[str, list] = {}
    k = 0
    while min((len(v) for v in by_task.values()), default=0) < rows_per_task and k < 200 * rows_per_task:
        task, ids, w = mix.row(k, seed)
        by_task.setdefault(task, [])
        if len(by_task[task]) < rows_per_task:
            by_task[task].append((ids, w))
        k += 1
    out = {}
    for task, rows in sorted(by_task.items()):
        ids = torch.stack([r[0] for r in rows]).to(device)
        w = torch.stack([r[1] for r in rows]).to(device)
        out[task] = round(cross_entropy(model(ids[:, :-1]), ids[:, 1:], w[:, 1:]).item(), 4)
    return out
