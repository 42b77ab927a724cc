"""The pixel tokenizer: images and clips <-> grids of FSQ code ids, the visual tokens of the one V4 vocabulary.

A convolutional autoencoder with an FSQ bottleneck (`dsv4.tokenizers.fsq`), trained from scratch (issue 22). One
model for both kinds, because an image is a one-frame clip (the MAGVIT-v2 / Cosmos layout):

    frame f           [3, H, W] -> spatial encoder (conv, ResBlocks, `down`x stride-2 halvings) -> [C, h, w]
    latent step 0     frame 0 alone                       -> FSQ -> [h, w] ids     (an image's tokens, always)
    latent step k>=1  (t = `temporal`), causal: no later frame enters
        keyframes     frame k t alone, as an image        -> FSQ -> [h, w] ids     (the image codes of that frame)
        packed        frames 1+(k-1)t .. kt, their C-channel latents side by side -> 1x1 conv -> FSQ -> [h, w] ids
    a clip of 1 + n t frames -> 1 + n latent steps of h x w ids; decoding mirrors it: a keyframe step's ids decode as
    an image, the t - 1 frames before it from the two keyframes around them (`between`: their points and how far
    along, through convs at the latent grid, added to the straight blend); a packed step's ids -> t frames.

Keyframes (the default) make a clip's later codes the same kind of codes as an image's, so a model draws an object
in a later keyframe with the codes it knows from pictures. In equal 1,300-step runs (docs/NOTES.md, issue 22, fourth
pass) text->video clips whose last frame still shows the captioned shape rose from 37.5% to 80%, and held-out
reconstructions improved for every kind. The price: the frames between keyframes are not coded but drawn between
them, which is exact only for motion as plain as the data's (a straight line at constant speed); a real-video
tokenizer would add codes for them.

`psnr` and `ssim` measure its reconstructions. Pixels go in and out as floats in [-1, 1] ([B, F, 3, H, W]);
`to_unit` / `to_uint8` convert. Shapes: B clips, F frames, T latent steps, h x w the latent grid (H / 2^down).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.atomic import atomic_path, atomic_text
from dsv4.tokenizers.fsq import FSQ


@dataclass
class PixelArgs:
    size: int = 32                # image side (square), a multiple of 2^down
    down: int = 2                 # spatial halvings: 32 -> 8 x 8 codes
    width: int = 64               # channels of the first stage (doubling per halving, capped at 4x)
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per latent channel: 1,000 codes
    temporal: int = 4             # frames per latent step after the first
    keyframes: bool = True        # later steps code their last frame as an image (False: the t frames packed)

    def to_dict(self) -> dict:
        return {**asdict(self), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict) -> PixelArgs:
        return cls(**{"keyframes": False, **d, "levels": tuple(d["levels"])})  # saved before keyframes: packed

    @property
    def grid(self) -> int:
        return self.size >> self.down

    def steps(self, frames: int) -> int:
        """Latent steps of a clip of `frames` frames (1 + n * temporal)."""
        if frames < 1 or (frames - 1) % self.temporal:
            raise ValueError(f"a clip has 1 + n * {self.temporal} frames (1, {1 + self.temporal}, "
                             f"{1 + 2 * self.temporal}, ...), got {frames}")
        return 1 + (frames - 1) // self.temporal


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _widths(args: PixelArgs) -> list[int]:
    return [args.width * min(2**i, 4) for i in range(args.down + 1)]


class SpatialEncoder(nn.Module):
    """[N, 3, H, W] -> [N, d, h, w] (d = FSQ channels, pre-quantisation)."""

    def __init__(self, args: PixelArgs):
        super().__init__()
        ws = _widths(args)
        self.stem = nn.Conv2d(3, ws[0], 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(ResBlock(ws[i]), nn.Conv2d(ws[i], ws[i + 1], 4, stride=2, padding=1))
            for i in range(args.down))
        self.out = nn.Sequential(ResBlock(ws[-1]), nn.GroupNorm(8, ws[-1]), nn.SiLU(),
                                 nn.Conv2d(ws[-1], len(args.levels), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.out(h)


class SpatialDecoder(nn.Module):
    """[N, d, h, w] grid points -> [N, 3, H, W] in [-1, 1] (tanh)."""

    def __init__(self, args: PixelArgs):
        super().__init__()
        ws = _widths(args)[::-1]
        self.stem = nn.Sequential(nn.Conv2d(len(args.levels), ws[0], 3, padding=1), ResBlock(ws[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ws[i], ws[i + 1], 3, padding=1),
                          ResBlock(ws[i + 1]))
            for i in range(args.down))
        self.out = nn.Sequential(nn.GroupNorm(8, ws[-1]), nn.SiLU(), nn.Conv2d(ws[-1], 3, 3, padding=1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        h = self.stem(q)
        for stage in self.stages:
            h = stage(h)
        return torch.tanh(self.out(h))


class PixelTokenizer(nn.Module):
    """Clips [B, F, 3, H, W] in [-1, 1] <-> code ids [B, T, h, w] (see the module docstring)."""

    def __init__(self, args: PixelArgs):
        super().__init__()
        if args.size % (1 << args.down):
            raise ValueError(f"size {args.size} is not a multiple of 2^down = {1 << args.down}")
        self.args = args
        d, t = len(args.levels), args.temporal
        self.encoder, self.decoder, self.fsq = SpatialEncoder(args), SpatialDecoder(args), FSQ(args.levels)
        if args.keyframes:  # two keyframes' points and how far along -> the points of a frame between them
            w = _widths(args)[-1]
            self.between = nn.Sequential(nn.Conv2d(2 * d + 1, w, 3, padding=1), ResBlock(w), ResBlock(w),
                                         nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, d, 1))
        else:
            self.pack = nn.Conv2d(t * d, d, 1)    # t frames' latents -> one latent step
            self.unpack = nn.Conv2d(d, t * d, 1)  # one latent step -> t frames' latents

    def latents(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] -> pre-quantisation latents [B, T, d, h, w]."""
        B, Fr = clips.shape[:2]
        T, t = self.args.steps(Fr), self.args.temporal
        if self.args.keyframes:  # frames 0, t, 2t, ...
            return self.encoder(clips[:, ::t].flatten(0, 1)).unflatten(0, (B, T))
        z = self.encoder(clips.flatten(0, 1)).unflatten(0, (B, Fr))  # [B, F, d, h, w]
        first = z[:, :1]
        if T == 1:
            return first
        rest = z[:, 1:].reshape(B * (T - 1), t * z.shape[2], *z.shape[3:])  # each step's t frames side by side
        return torch.cat([first, self.pack(rest).unflatten(0, (B, T - 1))], 1)

    def quantise(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] -> grid points [B, T, d, h, w] (straight-through)."""
        return self.fsq(self.latents(clips).movedim(2, -1)).movedim(-1, 2)

    def decode_points(self, q: torch.Tensor) -> torch.Tensor:
        """Grid points [B, T, d, h, w] -> [B, F, 3, H, W] with F = 1 + (T - 1) t."""
        B, T, d = q.shape[:3]
        frames = [q[:, :1]]
        if T > 1 and self.args.keyframes:
            frames.append(self.inbetween(q))
        elif T > 1:
            rest = self.unpack(q[:, 1:].flatten(0, 1))  # [B (T-1), t d, h, w]
            frames.append(rest.reshape(B, (T - 1) * self.args.temporal, d, *q.shape[3:]))
        z = torch.cat(frames, 1)
        return self.decoder(z.flatten(0, 1)).unflatten(0, z.shape[:2])

    def inbetween(self, q: torch.Tensor) -> torch.Tensor:
        """Keyframe points [B, T, d, h, w] -> the points of frames 1 .. (T-1) t: each step's t - 1 frames between
        the keyframes before and after them, then its keyframe."""
        B, T, d, h, w = q.shape
        t = self.args.temporal
        before, after = (x[:, :, None].expand(B, T - 1, t - 1, d, h, w) for x in (q[:, :-1], q[:, 1:]))
        along = (torch.arange(1, t, device=q.device, dtype=q.dtype) / t).view(1, 1, t - 1, 1, 1, 1)
        x = torch.cat([before, after, along.expand(B, T - 1, t - 1, 1, h, w)], 3).flatten(0, 2)
        blend = torch.lerp(before, after, along).flatten(0, 2)
        mid = (blend + self.between(x)).unflatten(0, (B, T - 1, t - 1))
        return torch.cat([mid, q[:, 1:, None]], 2).flatten(1, 2)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `clips` through the quantised bottleneck (what training compares with the input)."""
        return self.decode_points(self.quantise(clips))

    @torch.no_grad()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> code ids [B, T, h, w] (int64)."""
        return self.fsq.codes_to_indices(self.quantise(clips).movedim(2, -1))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, T, h, w] -> [B, F, 3, H, W] in [-1, 1]."""
        return self.decode_points(self.fsq.indices_to_codes(ids).movedim(-1, 2).to(self.decoder.out[-1].weight.dtype))


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    return pixels.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] ([..., 3, H, W]), over the whole batch: 10 log10(1 / MSE)
    on the [0, 1] scale."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of images in [-1, 1] ([N, 3, H, W]) on the [0, 1] scale: local
    means, variances and covariance under a `window` x `window` Gaussian (valid positions only; 7 rather than the
    usual 11 for 32-pixel images), C1 = 0.01^2, C2 = 0.03^2, averaged over positions, channels and images."""
    x, y = (t.float().flatten(0, -4) / 2 + 0.5 for t in (x, y))
    c = x.shape[1]
    k = torch.exp(-((torch.arange(window) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(c, 1, window, window)

    def blur(t):
        return torch.nn.functional.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def save_pixels(tok: PixelTokenizer, out: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(out / "pixels.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, tmp)
    atomic_text(out / "pixels.json", json.dumps(tok.args.to_dict(), indent=1))


def load_pixels(path: str | Path, device: torch.device | str = "cpu") -> PixelTokenizer:
    """The tokenizer saved in directory `path` (pixels.json + pixels.safetensors), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "pixels.json").exists():
        raise FileNotFoundError(f"{path} holds no pixel tokenizer (pixels.json); train one with `dsv4 pixels`")
    tok = PixelTokenizer(PixelArgs.from_dict(json.loads((path / "pixels.json").read_text())))
    tok.load_state_dict(load_file(path / "pixels.safetensors", device=str(device)))
    return tok.to(device).eval()
