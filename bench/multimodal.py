"""Issue 22's acceptance measures on a `dsv4 multimodal` checkpoint: generated samples judged by pixel analysis and
by a digit classifier trained only on real digits, over every caption of the procedural grammar.

    python bench/multimodal.py --ckpt runs/multimodal/final --json bench/results/multimodal.json \\
        --png bench/results/multimodal.png

    shapes    each of the 48 image captions x --samples: colour, shape and quadrant read back (all three = a match)
    digits    "the digit d" x 10 x --samples: the classifier names d; its accuracy on held-out real digits beside it
    clips     each of the 48 shape-motion captions and "the digit d moving DIR" (40): the motion read back
    animate   held-out shapes and real digits, each with a random direction: frame 0's PSNR against the given image,
              and the motion read back
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def shapes(vm, samples: int, cfg: float, seed: int) -> tuple[dict, torch.Tensor]:
    from dsv4.data.visual import all_image_specs
    from dsv4.engine.visual import generate_images
    from dsv4.eval.visual import read_image

    hits = {"colour": 0, "shape": 0, "quadrant": 0, "all": 0}
    grid = []
    specs = all_image_specs()
    for k, spec in enumerate(specs):
        for img in generate_images(vm, spec.caption, n=samples, cfg_scale=cfg, seed=seed + k * samples):
            r = read_image(img)
            ok = [r.colour == spec.colour, r.shape == spec.shape, r.quadrant == spec.quadrant]
            for name, good in zip(("colour", "shape", "quadrant"), ok):
                hits[name] += good
            hits["all"] += all(ok)
            if len(grid) < 16:
                grid.append(img)
    n = len(specs) * samples
    return {"samples": n, **{f"{k}_share": v / n for k, v in hits.items()}}, torch.stack(grid)


def digits(vm, samples: int, cfg: float, seed: int) -> tuple[dict, torch.Tensor]:
    from dsv4.data.digits import caption
    from dsv4.engine.visual import generate_images
    from dsv4.eval.digits import classify, train_classifier

    judge, real_acc = train_classifier(steps=600)
    right, grid = 0, []
    for d in range(10):
        imgs = generate_images(vm, caption(d), n=samples, cfg_scale=cfg, seed=seed + d * samples)
        right += int((classify(judge, imgs) == d).sum())
        grid.append(imgs[0])
    return {"samples": 10 * samples, "recognised_share": right / (10 * samples),
            "judge_accuracy_on_real_held_out": real_acc}, torch.stack(grid)


def clips(vm, steps: int, cfg: float, seed: int) -> tuple[dict, torch.Tensor]:
    from dsv4.data.digits import caption
    from dsv4.data.visual import DIRECTIONS, all_video_specs
    from dsv4.engine.visual import generate_clips
    from dsv4.eval.visual import matches, read_motion

    captions = [s.caption for s in all_video_specs()] + [caption(d, m) for d in range(10) for m in DIRECTIONS]
    moved = shape_match = 0
    for k, text in enumerate(captions):
        clip = generate_clips(vm, text, n=1, steps=steps, cfg_scale=cfg, seed=seed + k)[0]
        moved += read_motion(clip) == text.rsplit(" ", 1)[1]
        if not text.startswith("the digit"):
            shape_match += matches(clip, text)
        if k == 0:
            first = clip
    return {"clips": len(captions), "motion_share": moved / len(captions),
            "shape_clips_all_match_share": shape_match / 48}, first


def animate(vm, steps: int, cfg: float, seed: int, count: int = 40) -> tuple[dict, torch.Tensor]:
    from dsv4.data import digits as digit_data
    from dsv4.data.visual import DIRECTIONS, all_image_specs, draw_image
    from dsv4.engine.visual import generate_clips
    from dsv4.eval.visual import read_motion
    from dsv4.tokenizers.pixels import psnr, to_unit

    g = torch.Generator().manual_seed(seed + 999)
    images, labels = digit_data.load_mnist()
    _, held = digit_data.split(labels)
    specs, dirs = all_image_specs(), list(DIRECTIONS)
    moved, psnrs = 0, []
    for k in range(count):
        if k % 2 == 0:
            start = draw_image(specs[int(torch.randint(len(specs), (), generator=g))], 32, g)
        else:
            start = digit_data.digit_image(images[int(held[int(torch.randint(len(held), (), generator=g))])])
        direction = dirs[int(torch.randint(4, (), generator=g))]
        clip = generate_clips(vm, f"moving {direction}", n=1, steps=steps, image=start, cfg_scale=cfg,
                              seed=seed + k)[0]
        psnrs.append(psnr(to_unit(clip[0]), to_unit(start)))
        moved += read_motion(clip) == direction
        if k == 0:
            first = clip
    return {"clips": count, "motion_share": moved / count, "frame0_psnr_db_median": sorted(psnrs)[count // 2]}, first


def grid_png(rows: list[torch.Tensor], path: str) -> None:
    from PIL import Image

    from dsv4.atomic import atomic_path

    width = max(r.shape[0] for r in rows)
    lines = [torch.cat(list(r) + [torch.zeros_like(r[0])] * (width - r.shape[0]), 1) for r in rows]
    grid = torch.cat(lines, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(tmp, format="PNG")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--samples", type=int, default=2, help="images per caption")
    p.add_argument("--steps", type=int, default=3, help="latent steps per clip")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args()
    from dsv4.engine.visual import VisualModel

    vm = VisualModel.load(a.ckpt)
    t = time.perf_counter()
    report = {"benchmark": "issue 22 acceptance: generated samples judged", "ckpt": a.ckpt, "cfg_scale": a.cfg_scale}
    report["shapes"], shape_grid = shapes(vm, a.samples, a.cfg_scale, a.seed)
    report["digits"], digit_grid = digits(vm, a.samples, a.cfg_scale, a.seed)
    report["clips"], clip = clips(vm, a.steps, a.cfg_scale, a.seed)
    report["animate"], anim = animate(vm, a.steps, a.cfg_scale, a.seed)
    report["seconds"] = round(time.perf_counter() - t, 1)
    if a.png:
        grid_png([shape_grid[:8], shape_grid[8:16], digit_grid, clip, anim], a.png)
    emit(report, a.json)


if __name__ == "__main__":
    main()
