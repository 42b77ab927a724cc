"""The `dsv4` commands of image and video generation (issue 22): the pixel tokenizer, the multimodal run, and
sampling images and clips from its checkpoint. Registered in dsv4.cli's COMMANDS like the others."""

from dsv4.config import PRESETS


def add_pixels(subparsers):
    from dsv4.train.pixels import PixelTrainConfig

    d = PixelTrainConfig()
    p = subparsers.add_parser("pixels", help="train the pixel tokenizer (images and clips <-> FSQ codes)",
                              description="Train the FSQ autoencoder that turns images and clips into visual tokens, "
                              "on procedural shapes and MNIST-5k digits, then write OUT/pixels.safetensors, "
                              "OUT/pixels.json, OUT/report.json (PSNR, SSIM, code usage on held-out samples of each "
                              "kind) and OUT/reconstructions.png (originals above reconstructions).")
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="e.g. 5m: the steps are sized after the warm-up to end on time (overrides --steps)")
    p.add_argument("--width", type=int, default=d.width, help="channels of the first conv stage")
    p.add_argument("--packed", dest="keyframes", action="store_false",
                   help="code each later latent step as its four frames packed, instead of its last frame as an image")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(run=run_pixels)


def run_pixels(opts) -> int:
    import json

    from dsv4.train.budget import parse_duration
    from dsv4.train.pixels import PixelTrainConfig, train_pixels

    budget = parse_duration(opts.time_budget) if opts.time_budget else None
    cfg = PixelTrainConfig(out=opts.out, steps=10**9 if budget else opts.steps, time_budget=budget,
                           width=opts.width, keyframes=opts.keyframes, lr=opts.lr, seed=opts.seed)
    report = train_pixels(cfg)
    print(json.dumps(report["reconstruction"], indent=1))
    print(f"pixel tokenizer: {report['steps']} steps in {report['seconds']:.0f} s -> {opts.out}")
    return 0


def add_multimodal(subparsers):
    from dsv4.train.multimodal import MultimodalConfig

    d = MultimodalConfig()
    p = subparsers.add_parser("multimodal", help="train one model on text, images and clips",
                              description="Train the pixel tokenizer (or reuse OUT/pixels), then one V4 model on mixed "
                              "rows of text, text->image, text->video, image->video and image->caption in one "
                              "vocabulary, and write OUT/final (checkpoint, tokenizer.json, pixels/, multimodal.json).")
    p.add_argument("--out", default=d.out)
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    p.add_argument("--window", type=int, default=d.window, help="the sliding window, in tokens (0: the preset's)")
    p.add_argument("--time-budget", default=None, metavar="DURATION", help="e.g. 45m (overrides --steps)")
    p.add_argument("--steps", type=int, default=d.stage.steps)
    p.add_argument("--decay-frac", type=float, default=d.stage.decay_frac,
                   help="the share of the steps over which the lr decays (warmup-stable-decay)")
    for name in ("images", "clips"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name), help=f"captioned training {name}")
    for name in ("text_weight", "visual_weight", "drop_caption"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--mix", type=parse_mix, default=d.mix, metavar="TASK=W,...",
                   help="share of rows per task, e.g. 'text=0.2,text->image=0.4,text->video=0.2,image->video=0.1,"
                   "image->caption=0.1' (default: %(default)s)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one example per training row (default: visual examples packed while they fit)")
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--device", default=None)
    p.set_defaults(run=run_multimodal)


def parse_mix(text: str) -> dict[str, float]:
    import argparse

    from dsv4.data.multimodal import TASKS

    try:
        mix = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT,..., got {text!r}") from None
    if set(mix) - set(TASKS):
        raise argparse.ArgumentTypeError(f"unknown task(s) {sorted(set(mix) - set(TASKS))}; tasks: {TASKS}")
    return mix


def run_multimodal(opts) -> int:
    import dataclasses

    from dsv4.train.budget import parse_duration
    from dsv4.train.multimodal import MultimodalConfig, run_multimodal

    d = MultimodalConfig()
    cfg = dataclasses.replace(d, out=opts.out, preset=opts.preset, window=opts.window or None,
                              images=opts.images, clips=opts.clips,
                              time_budget=parse_duration(opts.time_budget) if opts.time_budget else None,
                              stage=dataclasses.replace(d.stage, steps=opts.steps, decay_frac=opts.decay_frac),
                              text_weight=opts.text_weight, visual_weight=opts.visual_weight,
                              drop_caption=opts.drop_caption, dtype=opts.dtype, mix=opts.mix, pack=opts.pack,
                              device=opts.device)
    print(f"multimodal: {run_multimodal(cfg)}")
    return 0


def _sampling_flags(p):
    from dsv4.cli import add_sampling_flags
    from dsv4.engine.visual import CFG_SCALE, TEMPERATURE

    p.add_argument("--ckpt", required=True, metavar="DIR", help="a `dsv4 multimodal` checkpoint (OUT/final)")
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="classifier-free guidance (1 = none)")
    add_sampling_flags(p, temperature=TEMPERATURE)
    p.add_argument("--scale", type=int, default=4, help="pixels per generated pixel in the written file")
    p.add_argument("--device", default=None)


def add_image(subparsers):
    p = subparsers.add_parser("image", help="text -> image with a multimodal checkpoint",
                              description="Sample images of PROMPT (e.g. 'a red circle in the top left', 'the digit "
                              "7') and write OUT.png, or OUT_0.png ... with -n K.")
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=1, help="how many images (OUT_0.png ... OUT_{n-1}.png)")
    _sampling_flags(p)
    p.set_defaults(run=run_visual, kind="image")


def add_video(subparsers):
    p = subparsers.add_parser("video", help="text -> clip (GIF or MP4) with a multimodal checkpoint",
                              description="Sample a clip of PROMPT (e.g. 'a blue square moving down') and write "
                              "OUT.gif or OUT.mp4.")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=3, help="latent steps (1 + 4 (steps - 1) frames)")
    _sampling_flags(p)
    p.set_defaults(run=run_visual, kind="video")


def add_animate(subparsers):
    p = subparsers.add_parser("animate", help="image -> clip (GIF or MP4): animate a picture as PROMPT says",
                              description="Start a clip from IMAGE (its first frame) and continue it as PROMPT (e.g. "
                              "'moving left') says; write OUT.gif or OUT.mp4.")
    p.add_argument("image", help="a PNG the size of the checkpoint's images (or any size: it is resized)")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=3, help="latent steps, the image's included")
    _sampling_flags(p)
    p.set_defaults(run=run_visual, kind="animate")


def run_visual(opts) -> int:
    from dsv4.cli import sampling_params
    from dsv4.engine.media import read_image_file, save_media
    from dsv4.engine.visual import VisualModel, generate_clips, generate_images

    vm = VisualModel.load(opts.ckpt, device=opts.device)
    kw = dict(params=sampling_params(opts), cfg_scale=opts.cfg_scale, seed=opts.seed or 0)
    if opts.kind == "image":
        out = generate_images(vm, opts.prompt, n=opts.n, **kw)
        paths = save_media(out if opts.n > 1 else out[:1], opts.output, opts.scale, numbered=opts.n > 1)
    else:
        image = read_image_file(opts.image, vm.size) if opts.kind == "animate" else None
        out = generate_clips(vm, opts.prompt, n=1, steps=opts.steps, image=image, **kw)
        paths = save_media(out, opts.output, opts.scale)
    print("\n".join(paths))
    return 0
