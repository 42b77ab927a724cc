"""Synthetic long-context tasks, the long-context training stage, and the needle-in-a-haystack evaluation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dsv4.data.tasks import KINDS, LongContextMix, TaskGenerator
from dsv4.eval.niah import needle_in_a_haystack, retrieved, write_report
from dsv4.train.config import StageConfig, TrainConfig
from dsv4.train.pipeline import run
from dsv4.train.plots import read_metrics
from dsv4.weights.checkpoint import from_pretrained
from tests.helpers import random_model
from tests.test_data import FEW
from tests.test_engine import tok  # noqa: F401  (a fixture)
from tests.test_train import VAL_FRAC, corpus  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def filler(tok):
    return np.array(tok.encode("".join(p.read_text() for p in FEW)), dtype=np.int64)


@pytest.mark.parametrize("kind", KINDS)
def test_samples_have_the_exact_length_and_answer_what_they_hide(tok, filler, kind):
    gen = TaskGenerator(tok, filler, seed=1)
    for length in (300, 1000, 4097):
        s = gen.sample(kind, length)
        assert len(s.ids) == len(s.answer_mask) == length
        text = tok.decode(s.ids)
        answers = [tok.decode([t for t, m in zip(s.ids, s.answer_mask) if m])]
        assert sum(s.answer_mask) > 0 and s.answer_mask[: s.prompt_len] == [0] * s.prompt_len
        assert s.answer_mask[s.prompt_len] == 1
        for a in s.answers:  # every answer is stated in the haystack before it is asked for
            assert a in answers[0] and text.index(a) < len(tok.decode(s.ids[: s.prompt_len]))
    again = TaskGenerator(tok, filler, seed=1).sample(kind, 300)
    assert again.ids == TaskGenerator(tok, filler, seed=1).sample(kind, 300).ids  # seeded


def test_passkey_depth_places_the_needle(tok, filler):
    gen = TaskGenerator(tok, filler, seed=0)
    for depth in (0.0, 0.5, 1.0):
        s = gen.sample("passkey", 2000, depth=depth)
        key = s.answers[0]
        prefix = tok.decode(s.ids[: s.prompt_len])
        at = prefix.index(f"The pass key is {key}") / len(prefix)
        assert abs(at - depth) < 0.1, (depth, at)
    with pytest.raises(ValueError, match="depths must be in"):
        gen.sample("passkey", 500, depth=1.5)
    with pytest.raises(ValueError, match="needs more than 10 tokens"):
        gen.sample("passkey", 10)


@pytest.mark.parametrize("kind", ["passkey", "copy", "kv"])
def test_edge_frac_puts_that_share_of_single_needles_at_depth_0_or_1(tok, filler, kind):
    """About edge_frac of the random depths are exactly 0 or 1 (half each), the rest uniform; a fixed depth stays
    fixed; multi-needle kinds keep uniform depths (no pile of needles at the edges)."""
    def depths(edge_frac, n=400):
        gen = TaskGenerator(tok, filler, seed=5, edge_frac=edge_frac)
        return np.array([d for _ in range(n) for d in gen.sample(kind, 300).depths])

    d = depths(0.3)
    edges = np.isin(d, (0.0, 1.0))
    if kind == "kv":
        assert not edges.any()
        return
    assert 0.22 < edges.mean() < 0.38 and 0.35 < (d[edges] == 1).mean() < 0.65
    inner = d[~edges]
    assert 0.4 < inner.mean() < 0.6 and inner.min() < 0.05 and inner.max() > 0.95  # the rest: uniform
    assert not np.isin(depths(0.0), (0.0, 1.0)).any()
    assert TaskGenerator(tok, filler, seed=5, edge_frac=1.0).sample(kind, 300, depth=0.5).depths == [0.5]
    with pytest.raises(ValueError, match="edge_frac must be in"):
        TaskGenerator(tok, filler, edge_frac=1.5)


def test_long_context_mix_batches(tok, filler):
    mix = LongContextMix(tok, filler, seq_len=256, task_frac=0.5)
    kinds = []
    for step in range(12):
        ids, targets, mask = mix.batch(2, seed=3, step=step)
        assert ids.shape == targets.shape == mask.shape == (2, 256)
        assert torch.equal(ids[:, 1:], targets[:, :-1])
        kinds.append("task" if (mask != 1).any() else "lm")
        again = mix.batch(2, seed=3, step=step)
        assert all(torch.equal(a, b) for a, b in zip((ids, targets, mask), again))  # a pure function of (seed, step)
        if kinds[-1] == "task":  # every token trains; a row's answers (stated before) weigh as much as the rest
            answers = mask != 1
            assert ((0 < answers.sum(1)) & (answers.sum(1) < 60)).all()
            assert torch.allclose((mask * answers).sum(1), (~answers).sum(1).float())
    assert {"task", "lm"} == set(kinds)
    with pytest.raises(ValueError, match="task_frac"):
        LongContextMix(tok, filler, 256, task_frac=2)
    with pytest.raises(ValueError, match="edge_frac must be in"):  # at once, not at the first task step
        LongContextMix(tok, filler, 256, edge_frac=-0.1)
    with pytest.raises(ValueError, match="tasks must be some of passkey, kv, multi_needle, recall, copy, got "
                                         "sort"):
        LongContextMix(tok, filler, 256, kinds=("sort",))


def test_recall_asks_for_the_rest_of_a_note_from_its_first_tokens(tok, filler):
    """Recall's answer is the note after its cue (many answer tokens per sample); a mix draws only the chosen tasks."""
    gen, marker, n, cue = TaskGenerator(tok, filler, seed=2), tok.encode("\n# Note: "), 1024 // 16, TaskGenerator.CUE
    for depth in (0.0, 0.5, 1.0):
        s = gen.sample("recall", 1024, depth=depth)
        at = next(i for i in range(len(s.ids)) if s.ids[i: i + len(marker)] == marker) + len(marker)
        note = s.ids[at: at + n]
        assert s.ids[s.prompt_len - cue: s.prompt_len] == note[:cue]
        assert [t for t, m in zip(s.ids, s.answer_mask) if m] == note[cue:] == s.ids[s.prompt_len:]
        assert abs(at / s.prompt_len - depth) < 0.1
    mix = LongContextMix(tok, filler, seq_len=1024, task_frac=1.0, kinds=("recall",))
    assert ((mix.batch(3, seed=0, step=0)[2] > 1).sum(1) == n - cue).all()


def test_copy_repeats_a_random_span_of_filler_tokens_at_the_end(tok, filler):
    gen = TaskGenerator(tok, filler, seed=4)
    spans = []
    for depth in (0.0, 0.5, 1.0):
        s = gen.sample("copy", 1024, depth=depth)
        span = s.ids[s.prompt_len - 1:]  # the repeat: its first token is the cue, the rest the answer
        assert len(span) == 48 and [t for t, m in zip(s.ids, s.answer_mask) if m] == span[1:]
        at = next(i for i in range(s.prompt_len) if s.ids[i: i + len(span)] == span)
        assert abs(at / (s.prompt_len - len(span)) - depth) < 0.05 and set(span) <= set(filler.tolist())
        spans.append(span)
    assert len({tuple(x) for x in spans}) == 3  # a fresh draw each time


def test_retrieved_needs_exactly_the_key_first():
    for output in (" 48213.", "48213", " 48213 is the pass key", "\n48213."):
        assert retrieved(output, "48213"), output
    for output in (" 482139", " 4821", " 48213"[:-1] + "4.", " the key is 48213", "", " 048213."):
        assert not retrieved(output, "48213"), output


def test_niah_scores_retrieval_and_writes_the_heat_map(tok, filler, tmp_path, monkeypatch):
    """A model that always answers with the key scores 1.0 in every cell; one that never does scores 0; the report
    is JSON and a PNG heat map."""
    from dsv4.engine import engine as engine_module

    model = random_model(0)
    real = engine_module.Engine.generate
    report = needle_in_a_haystack(model, tok, filler, lengths=[256, 512], depths=[0.0, 1.0], samples=1)
    assert report["lengths"] == [256, 512] and np.array(report["accuracy"]).shape == (2, 2)
    assert len(report["results"]) == 4 and all(r["length"] in (256, 512) for r in report["results"])
    other = needle_in_a_haystack(model, tok, filler, lengths=[256, 512], depths=[0.0, 1.0], samples=1, seed=1)
    assert [r["key"] for r in other["results"]] != [r["key"] for r in report["results"]]  # other prompts

    def oracle(self, prompts, params=None, **kw):  # answers with the key stated in the prompt
        text = tok.decode(prompts[0])
        key = text.split("The pass key is ")[1][:5]
        out = real(self, prompts, params, **kw)
        for o in out:
            o.token_ids = tok.encode(f" {key}.")
        return out

    monkeypatch.setattr(engine_module.Engine, "generate", oracle)
    perfect = needle_in_a_haystack(model, tok, filler, lengths=[256, 512], depths=[0.0, 0.5, 1.0], samples=2)
    assert perfect["accuracy"] == [[1.0] * 3] * 2 and perfect["by_length"] == [1.0, 1.0]
    json_path, png = write_report(perfect, tmp_path)
    assert json.loads(json_path.read_text())["accuracy"] == perfect["accuracy"]
    assert Image.open(png).size[0] > 200

    def wrong(self, prompts, params=None, **kw):
        out = real(self, prompts, params, **kw)
        for o in out:
            o.token_ids = tok.encode(" 00000.")
        return out

    monkeypatch.setattr(engine_module.Engine, "generate", wrong)
    assert needle_in_a_haystack(model, tok, filler, lengths=[256], depths=[0.5], samples=2)["accuracy"] == [[0.0]]


def test_long_context_stage_trains_the_indexer_on_tasks_then_continues_from_a_checkpoint(corpus, tmp_path):  # noqa: F811
    """pretrain -> longctx (dense indexer warm-up with KL, then sparse; tasks and corpus windows) -> final; then a
    second run starts from that checkpoint (--init) with only a long-context stage."""
    small = dict(batch_size=2, save_every=2, eval_every=2, eval_batches=1)
    cfg = TrainConfig(out=str(tmp_path / "run"), preset="tiny", data=str(corpus), val_frac=VAL_FRAC, dtype="fp32",
                      device="cpu", compile="off", pretrain=StageConfig(steps=2, seq_len=32, **small),
                      longctx=StageConfig(steps=4, seq_len=256, indexer_warmup=2, mtp_weight=0.0, **small),
                      longctx_task_frac=1.0, sft=StageConfig(steps=0))
    final = run(cfg, progress=False)
    rows = read_metrics(tmp_path / "run" / "longctx" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["indexer_kl"] > 0 for r in rows if "loss" in r)  # dense (all entries), then sparse (top-k)
    assert (final / "DONE").exists()

    # --init: a learning rate of 0 (and no balancing) must hand the checkpoint's weights through unchanged
    cont = TrainConfig(out=str(tmp_path / "more"), preset="tiny", data=str(corpus), val_frac=VAL_FRAC, dtype="fp32",
                       device="cpu", compile="off", init=str(final), pretrain=StageConfig(steps=0),
                       longctx=StageConfig(steps=2, seq_len=256, indexer_warmup=0, mtp_weight=0.0, lr=0.0,
                                           balance_gamma=0.0, **small),
                       longctx_task_frac=0.5, sft=StageConfig(steps=0))
    again = run(cont, progress=False)
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (final / "tokenizer.json").read_text()
    assert not (tmp_path / "more" / "pretrain").exists()
    before, after = (from_pretrained(p, dtype=torch.float32).state_dict() for p in (final, again))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="same --preset"):
        run(TrainConfig(out=str(tmp_path / "bad"), preset="small", init=str(final), data=str(corpus),
                        val_frac=VAL_FRAC, dtype="fp32", device="cpu", compile="off", pretrain=StageConfig(steps=0),
                        longctx=StageConfig(steps=1, seq_len=64), sft=StageConfig(steps=0)), progress=False)


def test_long_context_stage_alone_trains_a_fresh_model_and_nothing_to_train_is_an_error(corpus, tmp_path):  # noqa: F811
    common = dict(preset="tiny", data=str(corpus), val_frac=VAL_FRAC, dtype="fp32", device="cpu", compile="off",
                  pretrain=StageConfig(steps=0), sft=StageConfig(steps=0))
    final = run(TrainConfig(out=str(tmp_path / "lc"), longctx=StageConfig(steps=2, seq_len=128, batch_size=2,
                                                                           indexer_warmup=1, mtp_weight=0.0),
                            longctx_tasks=("copy",), longctx_task_frac=1.0, **common), progress=False)
    assert (final / "DONE").exists() and not (tmp_path / "lc" / "pretrain").exists()
    rows = read_metrics(tmp_path / "lc" / "longctx" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    with pytest.raises(ValueError, match="nothing to train"):
        run(TrainConfig(out=str(tmp_path / "none"), longctx=StageConfig(steps=0), **common), progress=False)
    assert not (tmp_path / "none").exists()


def test_cli_eval_niah_writes_json_and_heat_map(corpus, tmp_path, capsys):  # noqa: F811
    from dsv4.cli import main
    from tests.serve_util import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    argv = ["eval", "--ckpt", str(ckpt), "--no-bpb", "--no-samples", "--niah", "--niah-lengths", "256", "512",
            "--niah-depths", "3", "--niah-samples", "1", "--niah-seed", "3", "--niah-out", str(tmp_path / "niah"),
            "--data", str(corpus), "--val-frac", str(VAL_FRAC), "--dtype", "fp32",
            "--json", str(tmp_path / "eval.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "256 tokens:" in out and "512 tokens:" in out
    report = json.loads((tmp_path / "niah" / "niah.json").read_text())
    assert report["depths"] == [0.0, 0.5, 1.0] and len(report["results"]) == 6 and report["seed"] == 3
    assert (tmp_path / "niah" / "niah.png").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["niah"]["lengths"] == [256, 512]
