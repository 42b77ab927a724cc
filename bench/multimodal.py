"""Issue 22's acceptance measures on a `dsv4 multimodal` checkpoint: generated samples judged by pixel analysis and
by a digit classifier trained only on real digits, over every caption of the procedural grammar.

    python bench/multimodal.py --ckpt runs/multimodal/final --text-ckpt runs/text-only/final \\
        --json bench/results/multimodal.json --png-dir bench/results/multimodal

    shapes    each of the 48 image captions x --samples: colour, shape and quadrant read back (all three = a match)
    digits    "the digit d" x 10 x --samples: the classifier names d; its accuracy on held-out real digits beside it
    clips     each of the 48 shape-motion captions and "the digit d moving DIR" (40): the motion read back; for the
              shapes, colour and shape in the first frame and in the last
    animate   held-out shapes and real digits, each with a random direction its object has room to move in (as in
              every training clip; --animate-directions any: into the frame's edge too): frame 0's PSNR against the
              given image, and the motion read back, for shapes and digits apart too (with any: for the requests
              without room apart); for shapes, whether the last frame still shows the given colour and shape
    text      held-out bits per byte of the model and, with --text-ckpt, of a text-only model of the same vocabulary
              (what multimodality costs the text)
With --png-dir: shapes.png, digits.png (a row per digit), video.png and animate.png (a clip per row, its frames
across).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def shapes(vm, samples: int, cfg: float, seed: int, params) -> tuple[dict, torch.Tensor]:
    from dsv4.data.visual import all_image_specs
    from dsv4.engine.visual import generate_images
    from dsv4.eval.visual import read_image

    hits = {"colour": 0, "shape": 0, "quadrant": 0, "all": 0}
    grid = []
    specs = all_image_specs()
    for k, spec in enumerate(specs):
        for img in generate_images(vm, spec.caption, n=samples, params=params, cfg_scale=cfg,
                                   seed=seed + k * samples):
            r = read_image(img)
            ok = [r.colour == spec.colour, r.shape == spec.shape, r.quadrant == spec.quadrant]
            for name, good in zip(("colour", "shape", "quadrant"), ok):
                hits[name] += good
            hits["all"] += all(ok)
            if len(grid) == k:  # the first sample of each caption
                grid.append(img)
    n = len(specs) * samples
    return {"samples": n, **{f"{k}_share": v / n for k, v in hits.items()}}, grid


def digits(vm, samples: int, cfg: float, seed: int, params) -> tuple[dict, torch.Tensor]:
    from dsv4.data.digits import caption
    from dsv4.engine.visual import generate_images
    from dsv4.eval.digits import classify, train_classifier

    judge, real_acc = train_classifier(steps=600)
    right, grid = 0, []
    for d in range(10):
        imgs = generate_images(vm, caption(d), n=samples, params=params, cfg_scale=cfg, seed=seed + d * samples)
        right += int((classify(judge, imgs) == d).sum())
        grid.append(imgs[:10])
    return {"samples": 10 * samples, "recognised_share": right / (10 * samples),
            "judge_accuracy_on_real_held_out": real_acc}, grid


def clips(vm, steps: int, cfg: float, seed: int, params) -> tuple[dict, torch.Tensor]:
    from dsv4.data.digits import caption
    from dsv4.data.visual import DIRECTIONS, all_video_specs, parse_caption
    from dsv4.engine.visual import generate_clips
    from dsv4.eval.visual import matches, read_image, read_motion

    captions = [s.caption for s in all_video_specs()] + [caption(d, m) for d in range(10) for m in DIRECTIONS]
    moved = shape_match = kept = 0
    shown = []
    for k, text in enumerate(captions):
        clip = generate_clips(vm, text, n=1, steps=steps, params=params, cfg_scale=cfg, seed=seed + k)[0]
        moved += read_motion(clip) == text.rsplit(" ", 1)[1]
        if not text.startswith("the digit"):
            shape_match += matches(clip, text)
            last, spec = read_image(clip[-1]), parse_caption(text)
            kept += (last.colour, last.shape) == (spec.colour, spec.shape)
        if k % 11 == 0:
            shown.append(clip)
    return {"clips": len(captions), "motion_share": moved / len(captions),
            "shape_clips_all_match_share": shape_match / 48, "shape_clips_last_frame_as_captioned": kept / 48}, shown


def animate(vm, steps: int, cfg: float, seed: int, params, count: int = 40,
            directions: str = "room") -> tuple[dict, torch.Tensor]:
    from dsv4.data import digits as digit_data
    from dsv4.data.visual import DIRECTIONS, all_image_specs, draw_image
    from dsv4.engine.visual import generate_clips
    from dsv4.eval.visual import movable, read_image, read_motion
    from dsv4.tokenizers.pixels import psnr, to_unit

    g = torch.Generator().manual_seed(seed + 999)
    images, labels = digit_data.load_mnist()
    _, held = digit_data.split(labels)
    specs, dirs = all_image_specs(), list(DIRECTIONS)
    moved, psnrs, shown = [0, 0], [], []  # moved as prompted: [shapes, digits]
    cornered = []  # moved as prompted, for requests into an edge the object (nearly) touches (only with "any")
    kept = 0  # shapes whose last frame still shows the given colour and shape
    for k in range(count):
        if k % 2 == 0:
            start = draw_image(specs[int(torch.randint(len(specs), (), generator=g))], 32, g)
        else:
            start = digit_data.digit_image(images[int(held[int(torch.randint(len(held), (), generator=g))])])
        room = movable(start)
        options = room if directions == "room" else dirs
        direction = options[int(torch.randint(len(options), (), generator=g))]
        clip = generate_clips(vm, f"moving {direction}", n=1, steps=steps, image=start, params=params,
                              cfg_scale=cfg, seed=seed + k)[0]
        psnrs.append(psnr(to_unit(clip[0]), to_unit(start)))
        moved[k % 2] += read_motion(clip) == direction
        if k % 2 == 0:
            given, last = read_image(start), read_image(clip[-1])
            kept += (last.colour, last.shape) == (given.colour, given.shape)
        if direction not in room:
            cornered.append(read_motion(clip) == direction)
        if k < 8:
            shown.append(torch.cat([start[None], clip]))  # the given picture, then the clip
    return {"clips": count, "directions": directions, "motion_share": sum(moved) / count,
            "motion_share_shapes": moved[0] / ((count + 1) // 2), "motion_share_digits": moved[1] / max(1, count // 2),
            "shapes_kept_to_the_last_frame": kept / ((count + 1) // 2),
            "without_room": {"clips": len(cornered), "motion_share": sum(cornered) / max(1, len(cornered))},
            "frame0_psnr_db_median": sorted(psnrs)[count // 2]}, shown


def text_quality(ckpt: str, text_ckpt: str | None, max_tokens: int) -> dict:
    """Held-out bpb of the multimodal model and of the text-only one, on the same held-out files and windows."""
    from dsv4.engine.load import load_model
    from dsv4.eval.run import heldout_bpb

    out = {}
    for name, path in (("multimodal", ckpt), ("text_only", text_ckpt)):
        if path is None:
            continue
        model, tok = load_model(path, None, "fp32")
        r = heldout_bpb(model, tok, None, 0.03, 256, max_tokens)
        out[name] = {"ckpt": path, "bpb": round(r["bpb"], 4), "bigram_bpb": round(r["bigram_bpb"], 4),
                     "val_tokens": r["val_tokens"]}
    if text_ckpt:
        out["multimodal_over_text_only"] = round(out["multimodal"]["bpb"] / out["text_only"]["bpb"], 4)
    return out


def grid_png(rows: list[torch.Tensor], path: str) -> None:
    from PIL import Image

    from dsv4.atomic import atomic_path

    rows = [torch.stack(list(r)) if isinstance(r, (list, tuple)) else r for r in rows]
    width = max(r.shape[0] for r in rows)
    lines = [torch.cat(list(r) + [torch.zeros_like(r[0])] * (width - r.shape[0]), 1) for r in rows]
    grid = torch.cat(lines, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(tmp, format="PNG")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--text-ckpt", help="a text-only checkpoint of the same vocabulary, for the text comparison")
    p.add_argument("--samples", type=int, default=2, help="images per shape caption")
    p.add_argument("--digit-samples", type=int, default=10, help="images per digit")
    p.add_argument("--animate", type=int, default=40, help="pictures animated")
    p.add_argument("--animate-directions", choices=("room", "any"), default="room",
                   help="room: each picture is asked to move in one of the directions its object has room for "
                   "(as every training clip does); any: in any of the four, into the frame's edge too")
    p.add_argument("--steps", type=int, default=3, help="latent steps per clip")
    from dsv4.engine.visual import CFG_SCALE, TEMPERATURE

    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--text-tokens", type=int, default=100_000, help="held-out tokens for the text comparison")
    p.add_argument("--only", nargs="+", choices=("shapes", "digits", "clips", "animate", "text"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--png-dir")
    a = p.parse_args()
    from dsv4.engine.sampling import SamplingParams
    from dsv4.engine.visual import VisualModel

    vm = VisualModel.load(a.ckpt)
    params = SamplingParams(temperature=a.temperature, top_k=a.top_k)
    t = time.perf_counter()
    report = {"benchmark": "issue 22 acceptance: generated samples judged", "ckpt": a.ckpt, "cfg_scale": a.cfg_scale,
              "temperature": a.temperature, "top_k": a.top_k}
    grids = {}
    kinds = a.only or ("shapes", "digits", "clips", "animate", "text")
    if "shapes" in kinds:
        report["shapes"], grids["shapes"] = shapes(vm, a.samples, a.cfg_scale, a.seed, params)
    if "digits" in kinds:
        report["digits"], grids["digits"] = digits(vm, a.digit_samples, a.cfg_scale, a.seed, params)
    if "clips" in kinds:
        report["clips"], grids["video"] = clips(vm, a.steps, a.cfg_scale, a.seed, params)
    if "animate" in kinds:
        report["animate"], grids["animate"] = animate(vm, a.steps, a.cfg_scale, a.seed, params, a.animate,
                                                          a.animate_directions)
    if "text" in kinds:
        report["text"] = text_quality(a.ckpt, a.text_ckpt, a.text_tokens)
    report["seconds"] = round(time.perf_counter() - t, 1)
    if a.png_dir:
        os.makedirs(a.png_dir, exist_ok=True)
        for name, rows in grids.items():
            if name == "shapes":  # 8 captions a row
                rows = [rows[i:i + 8] for i in range(0, len(rows), 8)]
            grid_png(rows, os.path.join(a.png_dir, f"{name}.png"))
    emit(report, a.json)


if __name__ == "__main__":
    main()
