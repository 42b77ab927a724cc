"""dsv4.tokenizers.pixels and its trainer (dsv4.train.pixels): shapes of codes and frames, an image
is a clip's first latent step, later frames never reach earlier codes or pixels, the ids path equals the
straight-through path, training on the procedural shapes reconstructs them, and PSNR / SSIM against references."""

import json
import math

import pytest
import torch

from dsv4.data.visual import all_image_specs, draw_image
from dsv4.tokenizers.pixels import PixelArgs, PixelTokenizer, psnr, ssim, to_uint8, to_unit


def tokenizer(seed: int = 0, **kw) -> PixelTokenizer:
    torch.manual_seed(seed)
    return PixelTokenizer(PixelArgs(width=16, **kw)).eval()


def test_codes_and_frames_have_the_promised_shapes():
    tok = tokenizer()
    for frames, steps in ((1, 1), (5, 2), (9, 3)):
        clips = torch.rand(2, frames, 3, 32, 32) * 2 - 1
        ids = tok.encode(clips)
        assert ids.shape == (2, steps, 8, 8) and ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < tok.fsq.codebook_size == 1000
        assert tok.decode(ids).shape == clips.shape
    with pytest.raises(ValueError, match="1 \\+ n \\* 4 frames"):
        tok.encode(torch.zeros(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 2\\^down"):
        PixelTokenizer(PixelArgs(size=30))


@pytest.mark.parametrize("keyframes", [True, False])
def test_an_image_is_the_first_latent_step_and_later_frames_never_reach_back(keyframes):
    tok = tokenizer(1, keyframes=keyframes)
    g = torch.Generator().manual_seed(0)
    clips = torch.rand(2, 9, 3, 32, 32, generator=g) * 2 - 1
    ids = tok.encode(clips)
    assert torch.equal(tok.encode(clips[:, :1]), ids[:, :1])  # the image's own tokens
    assert torch.equal(tok.encode(clips[:, :5]), ids[:, :2])  # a shorter clip is a prefix of the codes
    changed = clips.clone()
    changed[:, 5:] = torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1  # the frames of the last step
    new = tok.encode(changed)
    assert torch.equal(new[:, :2], ids[:, :2]) and not torch.equal(new[:, 2], ids[:, 2])
    out, other = tok.decode(ids), ids.clone()
    other[:, 2] = (other[:, 2] + 1) % 1000
    out2 = tok.decode(other)
    assert torch.equal(out2[:, :5], out[:, :5]) and not torch.equal(out2[:, 5:], out[:, 5:])
    torch.testing.assert_close(tok(clips), out)  # decoding the ids = the straight-through reconstruction


def test_keyframe_codes_are_image_codes_and_the_frames_between_come_from_the_keyframes_around_them():
    tok = tokenizer(2)
    g = torch.Generator().manual_seed(1)
    clips = torch.rand(3, 9, 3, 32, 32, generator=g) * 2 - 1
    ids = tok.encode(clips)
    for k in range(3):  # step k = frame 4k coded as an image
        assert torch.equal(ids[:, k], tok.encode(clips[:, 4 * k:4 * k + 1])[:, 0])
    between = clips.clone()
    between[:, [1, 2, 3, 5, 6, 7]] = torch.rand(3, 6, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(tok.encode(between), ids)  # frames between keyframes are not coded
    out = tok.decode(ids)
    for k, frames in ((1, slice(1, 8)), (2, slice(5, 9))):  # step k: the frames between its neighbours' keyframes
        other = ids.clone()
        other[:, k] = (other[:, k] + 7) % 1000
        changed = (tok.decode(other) != out).flatten(2).any(2)  # [B, F]
        want = torch.zeros(9, dtype=torch.bool)
        want[frames] = True
        assert torch.equal(changed, want.expand(3, 9)), k
    for k in range(3):  # a keyframe decodes as its image does
        torch.testing.assert_close(out[:, 4 * k], tok.decode(ids[:, k:k + 1])[:, 0])


def test_a_tokenizer_saved_before_keyframes_loads_in_its_packed_layout(tmp_path):
    from dsv4.tokenizers.pixels import load_pixels, save_pixels

    packed = tokenizer(3, keyframes=False)
    save_pixels(packed, tmp_path)
    saved = json.loads((tmp_path / "pixels.json").read_text())
    del saved["keyframes"]  # as the first layout's files were written
    (tmp_path / "pixels.json").write_text(json.dumps(saved))
    loaded = load_pixels(tmp_path)
    assert not loaded.args.keyframes and hasattr(loaded, "pack") and not hasattr(loaded, "between")
    x = torch.rand(1, 5, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), packed.encode(x))


@pytest.mark.slow
def test_a_short_training_on_shapes_reconstructs_held_out_shapes():
    """150 Adam steps on procedural shapes take a fresh tokenizer's held-out PSNR from ~5 dB to over 18 dB."""
    specs = all_image_specs()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        picks = torch.randint(len(specs), (n,), generator=g).tolist()
        return torch.stack([to_unit(draw_image(specs[i], 32, g)) for i in picks])[:, None]

    tok = tokenizer(0).train()
    val = batch(48)
    with torch.no_grad():
        before = psnr(tok(val), val)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    for _ in range(150):
        x = batch(16)
        loss = (tok(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = psnr(tok(val), val)
    assert before < 10 and after > 18, (before, after)


def test_psnr_and_ssim_against_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mse = ((x - y) / 2).pow(2).mean().item()
    assert psnr(x, y) == pytest.approx(10 * math.log10(1 / mse)) and psnr(x, x) == float("inf")
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6) and ssim(x, y) < ssim(x, (x + y) / 2) < 1
    # one window by hand: a 7x7 image has exactly one valid position
    a, b = torch.rand(1, 3, 7, 7, generator=g), torch.rand(1, 3, 7, 7, generator=g)
    k = torch.exp(-((torch.arange(7) - 3.0) ** 2) / (2 * 1.5**2))
    w = k[:, None] * k[None, :] / k.sum() ** 2
    want = []
    for c in range(3):
        u, v = a[0, c], b[0, c]
        mu, mv = (w * u).sum(), (w * v).sum()
        su, sv, suv = (w * (u - mu) ** 2).sum(), (w * (v - mv) ** 2).sum(), (w * (u - mu) * (v - mv)).sum()
        c1, c2 = 0.01**2, 0.03**2
        want.append(((2 * mu * mv + c1) * (2 * suv + c2) / ((mu**2 + mv**2 + c1) * (su + sv + c2))).item())
    assert ssim(a * 2 - 1, b * 2 - 1) == pytest.approx(sum(want) / 3, abs=1e-5)


def test_pixels_convert_both_ways_exactly():
    px = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_unit(px)), px) and to_unit(px).shape == (4, 3, 32, 32)


def test_the_pixel_trainer_saves_a_loadable_tokenizer_and_reports_every_kind(tmp_path):
    from dsv4.tokenizers.pixels import load_pixels
    from dsv4.train.pixels import KINDS, PixelTrainConfig, code_usage, train_pixels

    cfg = PixelTrainConfig(out=str(tmp_path / "pixels"), steps=12, batch=8, clip_batch=2, width=16, held_out=8,
                           warmup=4)
    report = train_pixels(cfg, progress=False)
    out = tmp_path / "pixels"
    assert sorted(p.name for p in out.iterdir()) == ["pixels.json", "pixels.safetensors", "reconstructions.png",
                                                      "report.json"]
    assert report["steps"] == 12 and set(report["reconstruction"]) == set(KINDS)
    for kind, r in report["reconstruction"].items():
        assert r["frames"] == (9 if "clips" in kind else 1) and 0 < r["codes_used"] <= 1000 and r["ssim"] <= 1
    tok = load_pixels(out)
    x = torch.rand(2, 5, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), load_pixels(out).encode(x))
    with pytest.raises(FileNotFoundError, match="no pixel tokenizer"):
        load_pixels(tmp_path)
    usage = code_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert usage["codes_used"] == 2 and usage["share_used"] == 0.5 and usage["perplexity"] == pytest.approx(2.0)
    budgeted = train_pixels(PixelTrainConfig(out=str(tmp_path / "b"), steps=10**6, time_budget=3.0, batch=4,
                                             clip_batch=1, width=16, held_out=4, warmup=4), progress=False)
    assert 4 < budgeted["steps"] < 10**6  # sized by the measured warm-up


def test_the_pixels_command_trains_for_its_time_budget(tmp_path, capsys):
    from dsv4.cli import main
    from dsv4.tokenizers.pixels import load_pixels

    assert main(["pixels", "--out", str(tmp_path / "px"), "--time-budget", "3s", "--width", "16"]) == 0
    assert (tmp_path / "px" / "pixels.safetensors").exists() and "pixel tokenizer:" in capsys.readouterr().out
    assert load_pixels(tmp_path / "px").args.keyframes
    assert main(["pixels", "--out", str(tmp_path / "pk"), "--steps", "2", "--width", "16", "--packed"]) == 0
    assert not load_pixels(tmp_path / "pk").args.keyframes
    assert main(["pixels", "--out", str(tmp_path / "px2"), "--time-budget", "soon"]) == 2


def test_the_pixel_budget_follows_the_pace():
    from dsv4.train.pixels import budget_steps

    assert budget_steps(100, 50.0, 100.0) == 190  # 2 steps/s: 95 s of the 100 hold 190 steps
    assert budget_steps(100, 90.0, 100.0) == 105  # the machine slowed down: fewer steps than first planned
    assert budget_steps(100, 200.0, 100.0) == 101  # past the budget: one more step, then the run ends
    for step, elapsed in ((10, 1.0), (500, 30.0), (3000, 400.0)):
        n = budget_steps(step, elapsed, 420.0)
        assert n > step and (n - step) * elapsed / step <= 420.0 - elapsed + elapsed / step  # ends on time
