"""The multimodal run (issue 22): one V4 model that reads and writes text, images and clips in one vocabulary.

    OUT/pixels/               the pixel tokenizer (`dsv4.train.pixels`), trained first; reused when present
    OUT/tokenizer.json        the byte-level BPE of the text pipeline; OUT/data/ its token files
    OUT/items/                the captioned training images and clips, drawn once and tokenized by the pixel
                              tokenizer (codes.safetensors + captions.json)
    OUT/pretrain/             the Trainer's snapshots and metrics, on `dsv4.data.multimodal.MultimodalMix` rows
    OUT/final/                checkpoint (vocabulary = text + BOF + codes) + tokenizer.json + pixels/ + multimodal.json,
                              report.json (validation CE by task, expert load by modality: `dsv4.train.modality`)
                              and expert_load.png
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
from dsv4.train.modality import expert_load_by_modality, rows_by_task, task_losses
from dsv4.train.pipeline import build_model, prepare_data
from dsv4.train.pixels import PixelTrainConfig, train_pixels
from dsv4.train.plots import plot_expert_load
from dsv4.train.trainer import Trainer


@dataclass
class MultimodalConfig:
    out: str = "runs/multimodal"
    preset: str = "v4-2m"             # its vocabulary becomes the text part of the joint one
    # the sliding window: a clip (~200 tokens) whole, where the preset's 128 reaches back less than two steps
    window: int | None = 256          # None: the preset's
    data: str | None = None           # the text corpus (as `dsv4 train --data`): None = the standard library
    val_frac: float = 0.03
    time_budget: float | None = None  # seconds for the whole run
    pixel_share: float = 0.2          # of the time budget, for the pixel tokenizer
    pixels: PixelTrainConfig = field(default_factory=PixelTrainConfig)
    images: int = 12000               # captioned training images (half shapes, half digits)
    clips: int = 4000                 # captioned training clips (half shapes, half digits)
    # the lr decays over the last 40% of the steps: in equal steps, better than 20% on every task's validation CE and
    # on the judged samples (docs/NOTES.md, "issue 22, third pass")
    stage: StageConfig = field(default_factory=lambda: StageConfig(steps=600, batch_size=16, seq_len=256,
                                                                   decay_frac=0.4))
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    drop_caption: float = 0.1
    pack: bool = True                 # several visual examples per training row
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
                        drop_caption=cfg.drop_caption, weights=Weights(cfg.text_weight, cfg.visual_weight),
                        pack=cfg.pack)
    return tok, vocab, mix


def run_multimodal(cfg: MultimodalConfig, progress: bool = True) -> Path:
    """Run (or continue, or reuse the parts of) the whole multimodal pipeline -> OUT/final."""
    from dsv4.device import parse_device
    from dsv4.train.snapshot import load_latest
    from dsv4.weights.checkpoint import save_pretrained

    started, out = time.monotonic(), Path(cfg.out)
    if (out / "final" / "multimodal.json").exists():
        if progress:
            print(f"multimodal: reusing the finished run in {out / 'final'} (delete {out} to train again)", flush=True)
        return out / "final"
    out.mkdir(parents=True, exist_ok=True)
    device = parse_device(cfg.device)
    tok, vocab, mix = prepare(cfg, out, device, progress)
    window = {} if cfg.window is None else {"window_size": cfg.window}
    args, stage = ModelArgs.from_name(cfg.preset, vocab_size=vocab.size, **window), cfg.stage
    dtype = training_dtype(cfg.dtype, device, lambda: build_model(args, device, cfg.seed), stage, out / "dtype.json",
                           budgeted=bool(cfg.time_budget), progress=progress)
    val = [next(mix.batches(stage.batch_size, seed=cfg.seed + 1, start_step=i)) for i in range(stage.eval_batches)]
    trainer = Trainer(build_model(args, device, cfg.seed), stage, out / "pretrain",
                      lambda start: mix.batches(stage.batch_size, cfg.seed, start), val, dtype,
                      meta={"multimodal": asdict(cfg)}, progress=progress, desc="multimodal")
    trainer.resume()
    budget = StepBudget(deadline=started + cfg.time_budget, path=out / "pretrain" / "budget.json",
                        tokens_per_step=stage.tokens_per_step, schedule=stage.schedule,
                        warmup=stage.warmup, decay_frac=stage.decay_frac) if cfg.time_budget else None
    trainer.fit(budget)
    model = build_model(args, device, cfg.seed)  # the final weights at full precision, then the compute dtype
    model.load_state_dict(load_latest(out / "pretrain")["model"])
    model.to_dtype(dtype)
    rows = rows_by_task(mix, cfg.seed + 2, rows_per_task=8)
    report = {"val_ce_by_task": task_losses(model, rows, device),
              "expert_load_by_modality": expert_load_by_modality(model, rows, vocab, tok.pad_id, device)}
    with atomic_dir(out / "final") as tmp:
        save_pretrained(model, tmp)
        tok.save(Path(tmp) / "tokenizer.json")
        shutil.copytree(out / "pixels", Path(tmp) / "pixels")
        atomic_text(Path(tmp) / "multimodal.json", json.dumps(asdict(vocab), indent=1))
        atomic_text(Path(tmp) / "report.json", json.dumps(report, indent=1))
        plot_expert_load(report["expert_load_by_modality"], Path(tmp) / "expert_load.png")
    if progress:
        losses, tv = report["val_ce_by_task"], report["expert_load_by_modality"]["tv_from_text"]
        print("multimodal: validation CE by task " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
        for layer, d in tv.items():
            print(f"multimodal: {layer} expert load, total variation from text's: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in d.items()), flush=True)
    return out / "final"
