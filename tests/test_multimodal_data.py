"""dsv4.data.multimodal: every task's row holds the caption and the span the task promises, its weights count
exactly the targets the task trains on, dropped captions leave BOS + span, and batches are deterministic per row."""

import pytest
import torch

from dsv4.data.multimodal import PACK, TASKS, MultimodalMix, VisualItem, Weights, row
from tests.helpers import small_visual_vocab


@pytest.fixture(scope="module")
def setup():
    tok, vocab = small_visual_vocab()
    g = torch.Generator().manual_seed(0)
    images = [VisualItem(f"a red circle in the top left #{i}", torch.randint(0, 1000, (1, 16), generator=g))
              for i in range(5)]
    clips = [VisualItem(f"a blue square moving down #{i}", torch.randint(0, 1000, (3, 16), generator=g),
                        motion="moving down") for i in range(5)]
    return tok, vocab, images, clips


def test_each_task_row_holds_what_it_promises_and_weighs_only_its_targets(setup):
    tok, vocab, images, clips = setup
    w = Weights(text=0.5, visual=2.0)
    img, clip = images[0], clips[0]
    cap = tok.encode(img.caption)
    ids, weights = row("text->image", img, tok, vocab, w)
    assert ids == [tok.bos_id, *cap, *vocab.image(img.codes[0]), tok.eos_id] and len(weights) == len(ids)
    assert weights == [0.0] + [0.5] * len(cap) + [2.0] * (18 + 1)
    ids, weights = row("text->video", clip, tok, vocab, w)
    ((kind, codes),) = vocab.parse(ids)
    assert kind == "video" and torch.equal(codes, clip.codes)
    assert tok.decode(ids[1:1 + len(tok.encode(clip.caption))]) == clip.caption
    ids, weights = row("image->video", clip, tok, vocab, w)
    motion = tok.encode("moving down")
    assert ids[1:1 + len(motion)] == motion  # only the motion words
    given = 1 + len(motion) + 2 + 16  # BOS, the words, BOV BOF and the first step's codes
    assert weights[1 + len(motion):given] == [0.0] * 18 and set(weights[given:]) == {2.0}
    ids, weights = row("image->caption", img, tok, vocab, w)
    assert ids[1:19] == vocab.image(img.codes[0]) and ids[19:-1] == cap
    assert weights == [0.0] * 19 + [0.5] * (len(cap) + 1)
    ids, weights = row("text->image", img, tok, vocab, w, drop=True)
    assert ids == [tok.bos_id, *vocab.image(img.codes[0]), tok.eos_id]
    with pytest.raises(ValueError, match="unknown task"):
        row("image->sound", img, tok, vocab, w)
    with pytest.raises(ValueError, match="motion words"):
        row("image->video", img, tok, vocab, w)


def test_the_mix_draws_every_task_drops_captions_and_is_deterministic(setup):
    tok, vocab, images, clips = setup
    text = torch.randint(100, tok.vocab_size, (5000,), generator=torch.Generator().manual_seed(1))  # no specials
    mix = MultimodalMix(tok, vocab, text, images, clips, seq_len=128, drop_caption=0.5)
    tasks, dropped = {}, 0
    for k in range(300):
        task, ids, weights = mix.row(k)
        tasks[task] = tasks.get(task, 0) + 1
        assert ids.shape == weights.shape == (129,)
        assert bool((weights[ids == tok.pad_id] == 0).all())
        if task in ("text->image", "text->video"):
            dropped += int(ids[1] in (vocab.boi, vocab.bov))
    assert set(tasks) == set(TASKS) and 0.3 < dropped / (tasks["text->image"] + tasks["text->video"]) < 0.7
    a, b = next(mix.batches(4, seed=3, start_step=2)), next(mix.batches(4, seed=3, start_step=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (4, 128)
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are the next tokens
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        MultimodalMix(tok, vocab, text, images, clips, seq_len=30, mix={"text->video": 1.0}).row(0)
    with pytest.raises(ValueError, match="task mix"):
        MultimodalMix(tok, vocab, text, images, clips, seq_len=128, mix={"text->sound": 1.0})


def test_a_packed_row_is_whole_examples_back_to_back(setup):
    tok, vocab, images, clips = setup
    text = torch.randint(100, tok.vocab_size, (5000,), generator=torch.Generator().manual_seed(1))
    mix = MultimodalMix(tok, vocab, text, images, clips, seq_len=128, drop_caption=0.2)
    used, rows_text = [], 0
    for k in range(120):
        task, ids, w = mix.packed_row(k)
        first = mix.example(k * PACK)
        assert task == first[0]
        if task == "text":
            rows_text += 1
            assert ids.tolist() == first[1] and w.tolist() == first[2]
            continue
        # the visual examples it promised, in order, each whole: rebuild the row from them
        want_ids, want_w = [], []
        for j in range(PACK):
            t, e_ids, e_w = mix.example(k * PACK + j)
            if t == "text":
                continue
            if len(want_ids) + len(e_ids) > 129:
                break
            want_ids, want_w = want_ids + e_ids, want_w + e_w
        n = len(want_ids)
        assert ids[:n].tolist() == want_ids and w[:n].tolist() == want_w
        assert bool((ids[n:] == tok.pad_id).all()) and bool((w[n:] == 0).all())
        assert want_ids.count(tok.bos_id) == want_ids.count(tok.eos_id) >= 1
        used.append(n / 129)
    assert 0.15 < rows_text / 120 < 0.45  # the mix's 0.3, unchanged by packing
    assert sum(used) / len(used) > 0.7  # images are 21 tokens here: a row holds several
    loose = MultimodalMix(tok, vocab, text, images, clips, seq_len=128, pack=False)
    ids, targets, weights = next(loose.batches(3, seed=5))
    rows = [loose.row(j, 5) for j in range(3)]
    assert torch.equal(ids, torch.stack([r[1][:-1] for r in rows]))  # unpacked: one example per row
    assert torch.equal(weights, torch.stack([r[2][1:] for r in rows]))


def test_the_captioned_sampler_draws_what_its_captions_say():
    from dsv4.data.digits import load_mnist, parse_caption
    from dsv4.data.multimodal import VISUAL_KINDS, CaptionedSampler
    from dsv4.eval.visual import matches, read_motion

    sampler, g = CaptionedSampler(32, 9, "held_out"), torch.Generator().manual_seed(0)
    images, labels = load_mnist()
    for _ in range(10):
        for kind in VISUAL_KINDS:
            caption, motion, px = sampler.sample(kind, g)
            assert px.shape == ((9 if "clips" in kind else 1), 32, 32, 3)
            assert (motion is None) == ("clips" not in kind)
            if kind.startswith("shape"):
                assert matches(px if motion else px[0], caption)
            else:
                digit, direction = parse_caption(caption)
                assert direction == (motion.split()[1] if motion else None)
                if motion:
                    assert read_motion(px) == direction
                else:  # the pixels are a held-out digit of that class
                    same = (images == px[0, 2:30, 2:30, 0]).flatten(1).all(1).nonzero().flatten()
                    assert int(labels[same[0]]) == digit
    with pytest.raises(ValueError, match="unknown kind"):
        sampler.sample("sounds", g)
