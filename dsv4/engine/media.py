"""Generated pixels as files and bytes: PNG for images, GIF or MP4 (H.264, through PyAV's bundled FFmpeg) for clips,
each generated pixel drawn as a `scale` x `scale` block (nearest neighbour: the samples are 32 x 32). Used by
`dsv4 image` / `video` / `animate` and by the server's image and video endpoints.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

IMAGE_FORMATS = ("png",)
CLIP_FORMATS = ("gif", "mp4")
MIME = {"png": "image/png", "gif": "image/gif", "mp4": "video/mp4"}


def _frames(sample: torch.Tensor, scale: int) -> list:
    from PIL import Image

    frames = sample if sample.dim() == 4 else sample[None]
    return [Image.fromarray(f.cpu().numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
            for f in frames]


def encode_media(sample: torch.Tensor, fmt: str, scale: int = 4, fps: int = 6) -> bytes:
    """One uint8 image [H, W, 3] (fmt "png") or clip [F, H, W, 3] ("gif" or "mp4") -> the file's bytes."""
    clip = sample.dim() == 4
    allowed = CLIP_FORMATS if clip else IMAGE_FORMATS
    if fmt not in allowed:
        raise ValueError(f"{'a clip' if clip else 'an image'} is written as {' or '.join(allowed)}, not {fmt!r}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    frames, buf = _frames(sample, scale), io.BytesIO()
    if fmt == "png":
        frames[0].save(buf, format="PNG")
    elif fmt == "gif":
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    else:
        _mp4(frames, buf, fps)
    return buf.getvalue()


def _mp4(frames: list, buf: io.BytesIO, fps: int) -> None:
    import av
    import numpy as np

    w, h = frames[0].size
    if w % 2 or h % 2:  # H.264 in yuv420p halves the chroma planes
        raise ValueError(f"an MP4 needs even sides, got {w} x {h}: use an even scale")
    with av.open(buf, mode="w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12"}  # flat colours and hard edges: keep them crisp
        for f in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(f.convert("RGB")), format="rgb24")))
        box.mux(stream.encode())


def read_clip_bytes(data: bytes) -> torch.Tensor:
    """A GIF or MP4's bytes -> uint8 [F, H, W, 3] (what the tests and the acceptance bench read back)."""
    import numpy as np

    if data[4:8] == b"ftyp":
        import av

        with av.open(io.BytesIO(data)) as box:
            return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)]))
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]))


def save_media(x: torch.Tensor, path: str | Path, scale: int = 4, numbered: bool = False, fps: int = 6) -> list[str]:
    """Write uint8 images [n, H, W, 3] as PNGs or clips [n, F, H, W, 3] as GIFs or MP4s (by the suffix), atomically
    -> the paths written: `path` itself, or PATH_0.EXT ... with `numbered`."""
    from dsv4.atomic import atomic_path

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    allowed = CLIP_FORMATS if x.dim() == 5 else IMAGE_FORMATS
    if fmt not in allowed:
        raise ValueError(f"{path}: {'a clip' if x.dim() == 5 else 'an image'} is written as "
                         f"{' or '.join('.' + f for f in allowed)}")
    if len(x) > 1 and not numbered:
        raise ValueError(f"{len(x)} samples need numbered files")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(x):
        target = path.with_name(f"{path.stem}_{i}{path.suffix}") if numbered else path
        data = encode_media(sample, fmt, scale, fps)
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(data)
        written.append(str(target))
    return written


def read_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> uint8 [size, size, 3] (RGB; `read_image_bytes`)."""
    with open(path, "rb") as f:
        return read_image_bytes(f.read(), size)


def read_image_bytes(data: bytes, size: int) -> torch.Tensor:
    """An encoded image (PNG, JPEG, GIF's first frame, ...) -> uint8 [size, size, 3]: a square k times the size is
    box-averaged (exact for a nearest-neighbour upscale), any other size resampled; not an image: ValueError."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w == h and w % size == 0:  # e.g. a picture `dsv4 image` wrote at --scale k: its pixels exactly
                im = im.reduce(w // size)
            elif (w, h) != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy())
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image: {e}") from e
