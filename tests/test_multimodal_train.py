"""dsv4.train.multimodal: the whole multimodal pipeline on a tiny model, a few steps each: every part lands where the
module says, the final checkpoint's vocabulary is text + BOF + codes and its tokenizer, pixel tokenizer and
vocabulary file load back, the tokenized items parse as the spans they are, and a second call reuses everything."""

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4.tokenizers.pixels import load_pixels
from dsv4.train.config import StageConfig
from dsv4.train.multimodal import MultimodalConfig, load_items, run_multimodal
from dsv4.train.pixels import PixelTrainConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.mark.slow
def test_the_multimodal_pipeline_writes_a_checkpoint_of_the_joint_vocabulary(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "fnmatch.py"):
        shutil.copy(STDLIB / name, corpus / name)
    cfg = MultimodalConfig(
        out=str(tmp_path / "mm"), preset="tiny", data=str(corpus), val_frac=0.3,
        pixels=PixelTrainConfig(steps=4, batch=4, clip_batch=1, width=16, held_out=4, warmup=2), images=6, clips=4,
        stage=StageConfig(steps=3, batch_size=2, seq_len=256, warmup=1, eval_every=2, save_every=2, eval_batches=1),
        device="cpu", dtype="fp32")
    final = run_multimodal(cfg, progress=False)
    vocab = json.loads((final / "multimodal.json").read_text())
    config = json.loads((final / "config.json").read_text())
    assert vocab["codebook"] == 1000 and vocab["step_codes"] == 64
    assert config["vocab_size"] == vocab["text_size"] + 1 + 1000 and config["sliding_window"] == 256
    assert load_pixels(final / "pixels").fsq.codebook_size == 1000 and (final / "tokenizer.json").exists()
    losses = json.loads((final / "report.json").read_text())["val_ce_by_task"]
    assert set(losses) == {"text", "text->image", "text->video", "image->video", "image->caption"}
    assert all(0 < v < 20 for v in losses.values())
    items = load_items(tmp_path / "mm" / "items")
    assert len(items["images"]) == 6 and len(items["clips"]) == 4
    assert items["images"][0].codes.shape == (1, 64) and items["clips"][0].codes.shape == (3, 64)
    assert items["clips"][1].caption.startswith("the digit ") and items["clips"][1].motion.startswith("moving ")
    rows = [json.loads(line) for line in (tmp_path / "mm" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # generation through the engine: constrained spans, guided or not, deterministic per seed
    from dsv4.engine.sampling import SamplingParams
    from dsv4.engine.visual import VisualModel, generate_clips, generate_images

    vm = VisualModel.load(final)
    imgs = generate_images(vm, "a red circle in the top left", n=2, cfg_scale=3.0, seed=5)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == torch.uint8
    assert torch.equal(imgs, generate_images(vm, "a red circle in the top left", n=2, cfg_scale=3.0, seed=5))
    plain = generate_images(vm, "the digit 3", n=1, params=SamplingParams(temperature=0), cfg_scale=1.0)
    assert plain.shape == (1, 32, 32, 3)
    clips = generate_clips(vm, "a blue square moving down", n=1, steps=3, seed=1)
    assert clips.shape == (1, 9, 32, 32, 3)
    start = imgs[0]
    animated = generate_clips(vm, "moving left", n=1, steps=2, image=start)
    from dsv4.tokenizers.pixels import to_uint8, to_unit

    recon = to_uint8(vm.pixels(to_unit(start)[None, None]))[0, 0]
    assert animated.shape == (1, 5, 32, 32, 3) and torch.equal(animated[0, 0], recon)  # frame 0 is the given image
    with pytest.raises(FileNotFoundError, match="not a multimodal checkpoint"):
        VisualModel.load(tmp_path / "mm" / "pixels")
    # the commands: images (numbered with -n), a clip, an animated picture; wrong file kinds refused
    from PIL import Image

    from dsv4.cli import main

    out = tmp_path / "gen"
    assert main(["image", "--ckpt", str(final), "a red circle in the top left", "-o", str(out / "c.png"), "-n", "2",
                 "--seed", "5", "--cfg-scale", "3"]) == 0
    with Image.open(out / "c_0.png") as im:
        assert im.size == (128, 128)  # --scale 4
        assert torch.equal(torch.from_numpy(np.asarray(im.convert("RGB")))[::4, ::4], imgs[0])
    assert main(["video", "--ckpt", str(final), "a blue square moving down", "-o", str(out / "v.gif")]) == 0
    with Image.open(out / "v.gif") as im:
        assert im.n_frames == 9
    assert main(["animate", "--ckpt", str(final), str(out / "c_0.png"), "moving left", "-o", str(out / "a.gif"),
                 "--steps", "2"]) == 0
    with Image.open(out / "a.gif") as im:
        assert im.n_frames == 5
    assert main(["video", "--ckpt", str(final), "a blue square moving down", "-o", str(out / "v.mp4"),
                 "--scale", "2"]) == 0
    from dsv4.engine.media import read_clip_bytes

    assert read_clip_bytes((out / "v.mp4").read_bytes()).shape == (9, 64, 64, 3)
    assert main(["video", "--ckpt", str(final), "x", "-o", str(out / "v.png")]) == 2
    assert main(["image", "--ckpt", str(tmp_path), "x", "-o", str(out / "x.png")]) == 2
    stamp = (tmp_path / "mm" / "pixels" / "pixels.safetensors").stat().st_mtime_ns
    final_stamp = (final / "report.json").stat().st_mtime_ns
    assert run_multimodal(cfg, progress=False) == final  # a finished run is reused whole
    assert (final / "report.json").stat().st_mtime_ns == final_stamp
    shutil.rmtree(final)
    run_multimodal(cfg, progress=False)  # reuses the tokenizers and items, and the finished stage
    assert (tmp_path / "mm" / "pixels" / "pixels.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((final / "report.json").read_text())["val_ce_by_task"] == losses
    assert (final / "expert_load.png").exists()


def test_the_multimodal_command_maps_its_flags_onto_the_config(monkeypatch, capsys):
    import dsv4.train.multimodal as mm
    from dsv4.cli import main

    seen = []
    monkeypatch.setattr(mm, "run_multimodal", lambda cfg: seen.append(cfg) or Path(cfg.out) / "final")
    assert main(["multimodal", "--out", "x", "--time-budget", "45m", "--images", "10", "--visual-weight", "2",
                 "--drop-caption", "0.2", "--steps", "7"]) == 0
    (cfg,) = seen
    assert (cfg.out, cfg.time_budget, cfg.images, cfg.visual_weight, cfg.drop_caption, cfg.stage.steps) == (
        "x", 2700.0, 10, 2.0, 0.2, 7)
    assert "x/final" in capsys.readouterr().out
    assert cfg.pack and cfg.mix == mm.MultimodalConfig().mix
    assert cfg.stage.decay_frac == 0.4 and cfg.stage.batch_size == 16  # the run's defaults, not `dsv4 train`'s
    assert main(["multimodal", "--mix", "text=0.5, text->image=0.5", "--no-pack"]) == 0
    assert seen[1].mix == {"text": 0.5, "text->image": 0.5} and not seen[1].pack
    assert main(["multimodal", "--decay-frac", "0.25"]) == 0 and seen[2].stage.decay_frac == 0.25
    assert seen[2].window == 256  # the whole clip in the sliding window
    assert main(["multimodal", "--window", "0"]) == 0 and seen[3].window is None  # the preset's
    for bad in ("text=0.5,video=0.5", "text:1"):
        with pytest.raises(SystemExit):
            main(["multimodal", "--mix", bad])
