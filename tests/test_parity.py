"""Logits parity with the numerical reference, transformers.DeepseekV4ForCausalLM (fp32), weights passed both ways:
our save_pretrained -> their from_pretrained, and their save_pretrained -> our from_pretrained."""

import pytest
import torch

import dsv4
from dsv4 import save_pretrained
from tests.helpers import PARITY_CONFIGS, random_ids, random_model

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 7, 129, 300)
TOL = 1e-4


def hf_from_dir(path):
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def logits_pair(ours, theirs, ids):
    with torch.no_grad():
        return ours(ids), theirs(ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_our_weights_in_their_model(name, tmp_path):
    ours = random_model(seed=1, **PARITY_CONFIGS[name])
    save_pretrained(ours, tmp_path)
    theirs = hf_from_dir(tmp_path)
    for i, S in enumerate(LENGTHS):
        a, b = logits_pair(ours, theirs, random_ids(ours.args, 2, S, seed=i))
        err = (a - b).abs().max().item()
        assert err < TOL, f"{name} S={S}: max-abs {err:.2e}"


@pytest.mark.parametrize("name", ["mixed", "hc1", "csa_learned"])
def test_their_weights_in_our_model(name, tmp_path):
    donor = random_model(seed=2, **PARITY_CONFIGS[name])
    save_pretrained(donor, tmp_path / "donor")
    theirs = hf_from_dir(tmp_path / "donor")
    theirs.save_pretrained(tmp_path / "theirs")  # written by transformers itself
    ours = dsv4.from_pretrained(tmp_path / "theirs", dtype=torch.float32).eval()
    for i, S in enumerate(LENGTHS):
        a, b = logits_pair(ours, theirs, random_ids(ours.args, 2, S, seed=10 + i))
        err = (a - b).abs().max().item()
        assert err < TOL, f"{name} S={S}: max-abs {err:.2e}"


def test_parity_check_catches_a_transposed_comb(monkeypatch, tmp_path):
    """The weights are far enough from uniform mixing that using comb untransposed breaks parity."""
    import dsv4.model.hyper as hyper

    ours = random_model(seed=3)
    save_pretrained(ours, tmp_path)
    theirs = hf_from_dir(tmp_path)
    ids = random_ids(ours.args, 2, 40)
    original = hyper.hc_post

    def untransposed(y, h, post, comb):
        return original(y, h, post, comb.transpose(-1, -2))

    monkeypatch.setattr("dsv4.model.hyper.hc_post", untransposed)
    a, b = logits_pair(ours, theirs, ids)
    assert (a - b).abs().max() > 100 * TOL


def test_engine_decodes_what_transformers_generates(tmp_path):
    """Our cached, chunked decoding on a checkpoint written by transformers = transformers' own cached `generate`."""
    from dsv4.engine import Engine, SamplingParams
    from dsv4.tokenizers.text import Tokenizer
    from tests.test_data import FEW

    donor = random_model(seed=4, **PARITY_CONFIGS["mixed"])
    save_pretrained(donor, tmp_path / "donor")
    theirs = hf_from_dir(tmp_path / "donor")
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dsv4.from_pretrained(tmp_path / "theirs", dtype=torch.float32).eval()
    ids = random_ids(ours.args, 1, 37, seed=5)  # 37 + 30 crosses the window (16) and both compression ratios
    with torch.no_grad():
        want = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                               do_sample=False, pad_token_id=0)[0, 37:].tolist()
    tok = Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)
    engine = Engine(ours, tok, max_batch=2, prefill_chunk=10)
    got = engine.generate([ids[0].tolist()], SamplingParams(temperature=0), max_new_tokens=30, ignore_eos=True)
    assert got[0].token_ids == want
