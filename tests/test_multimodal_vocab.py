"""dsv4.tokenizers.multimodal: images and clips become token spans after the text ids and parse back exactly; a
decoder that follows SpanConstraint, whatever it picks among the allowed ids, always writes a span of the exact
shape; anything else is refused where it breaks the grammar."""

import pytest
import torch

from dsv4.data.corpus import stdlib_files
from dsv4.tokenizers.multimodal import SpanConstraint, TextOnly, VisualVocab
from dsv4.tokenizers.text import BOI, EOI, Tokenizer


@pytest.fixture(scope="module")
def vocab():
    root, files = stdlib_files()
    tok = Tokenizer.train((f.read_text() for f in files[:4]), vocab_size=512, n_vis=4)
    return VisualVocab.build(tok, codebook=1000, step_codes=16), tok


def test_images_and_clips_round_trip_through_the_joint_vocabulary(vocab):
    v, tok = vocab
    assert (v.bof, v.code0, v.size) == (tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 1001)
    assert (v.boi, v.eoi) == (tok.token_id(BOI), tok.token_id(EOI)) and v.boi < tok.vocab_size
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 1000, (4, 4), generator=g)
    clip = torch.randint(0, 1000, (3, 4, 4), generator=g)
    caption = tok.encode("a red circle in the top left")
    seq = caption + v.image(img) + tok.encode(" then ") + v.video(clip)
    assert max(caption) < tok.vocab_size and len(v.image(img)) == 18 and len(v.video(clip)) == 2 + 3 * 17
    (k1, a), (k2, b) = v.parse(seq)
    assert (k1, k2) == ("image", "video") and torch.equal(a, img.reshape(1, 16)) and torch.equal(b, clip.reshape(3, 16))
    assert torch.equal(v.parse(v.video(img[None]))[0][1], v.parse(v.image(img))[0][1])  # an image = a 1-step clip
    with pytest.raises(ValueError, match="16 codes"):
        v.image(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        v.image(torch.full((4, 4), 1000))


def test_a_decoder_that_keeps_to_the_constraint_always_writes_an_exact_span(vocab):
    v, _ = vocab
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        video = trial % 2 == 1
        steps = 1 + trial % 4 if video else 1
        c = SpanConstraint(v, steps=steps, video=video)
        seq = [v.bov if video else v.boi]
        while not c.done:
            lo, hi = c.allowed()
            logits = torch.randn(v.size, generator=g)
            masked = c.mask(logits)
            assert bool(torch.isinf(masked[:lo]).all()) and bool(torch.isinf(masked[hi:]).all())
            token = int(torch.multinomial(masked.softmax(-1), 1, generator=g))
            assert lo <= token < hi
            c.advance(token)
            seq.append(token)
        ((kind, codes),) = v.parse(seq)
        assert kind == ("video" if video else "image") and codes.shape == (steps, 16)
        with pytest.raises(ValueError, match="closed"):
            c.allowed()


def test_sequences_that_break_the_grammar_are_refused_where_they_break(vocab):
    v, _ = vocab
    img = v.image(torch.zeros(4, 4, dtype=torch.long))
    for bad, where in ((img[:-1], "end of image"), (img[:5] + [7] + img[6:], "visual codes from position 1"),
                       ([v.bov, v.eov], "no latent step"), ([v.code0], "outside"), ([v.bof], "outside"),
                       (v.video(torch.zeros(1, 4, 4, dtype=torch.long))[:-1], "end of video")):
        with pytest.raises(ValueError, match=where):
            v.parse(bad)
    c = SpanConstraint(v)
    with pytest.raises(ValueError, match="breaks the span's grammar"):
        c.advance(v.eoi)  # too early


def test_text_only_keeps_a_reply_to_text_ids(vocab):
    vocab, _ = vocab
    rule = TextOnly(vocab.text_size)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(3, vocab.size, generator=g) * 5
        logits[:, vocab.code0:] += 100  # the visual ids would win unmasked
        masked = rule.mask(logits)
        assert torch.equal(masked[:, :vocab.text_size], logits[:, :vocab.text_size])
        assert bool(torch.isinf(masked[:, vocab.text_size:]).all())
        token = int(masked[0].argmax())
        rule.advance(token)
        assert token < vocab.text_size and not rule.done
    with pytest.raises(ValueError, match="not a text id"):
        rule.advance(vocab.bof)
