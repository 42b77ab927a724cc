"""`dsv4 eval` (dsv4.eval.run.evaluate) on a tiny checkpoint: held-out bpb next to the bigram, sample completions,
which settings come from the checkpoint's train_config.json, and the JSON report. (tests/test_tasks.py runs --niah.)"""

import json

import pytest

from dsv4.cli import main
from dsv4.eval import run as ev
from tests.serve_util import tiny_checkpoint
from tests.test_train import VAL_FRAC, corpus  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("eval") / "final")


def test_settled_prefers_what_is_given_then_the_checkpoint():
    trained = ev.TrainedOn("corpus/", 0.1, 256)
    assert ev.settled(trained, None, None, None) == trained
    assert ev.settled(trained, "other/", 0.2, 64) == ev.TrainedOn("other/", 0.2, 64)
    assert ev.settled(None, None, None, None) == ev.TrainedOn(None, 0.03, 512)


@pytest.mark.slow
def test_cli_eval_reports_bpb_and_samples(ckpt, corpus, tmp_path, capsys):  # noqa: F811
    report_path = tmp_path / "eval.json"
    argv = ["eval", "--ckpt", str(ckpt), "--data", str(corpus), "--val-frac", str(VAL_FRAC), "--seq-len", "64",
            "--max-tokens", "256", "--dtype", "fp32", "--device", "cpu", "--json", str(report_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out bits per byte:" in out and "Kneser-Ney baselines: bigram" in out and "4-gram" in out
    report = json.loads(report_path.read_text())
    assert report["ckpt"] == str(ckpt) and "humaneval" not in report and "niah" not in report
    bpb = report["bpb"]
    assert bpb["val_tokens"] <= 256 and bpb["bpb"] > 0 and bpb["val_files"] >= 1
    assert (bpb["window"], bpb["stride"]) == (64, 32) and "64-token windows every 32" in out  # half a window
    assert all(bpb[k] > 0 for k in ("bigram_bpb", "kn3_bpb", "kn4_bpb"))
    assert [s["mode"] for s in report["samples"]] == ["raw"] * len(ev.COMPLETION_PROMPTS) + ["chat"]
    syntax = report["syntax"]  # the held-out files' functions, completed by an untrained model
    assert syntax["signatures"] > 0 and 0 <= syntax["parsed"] <= syntax["ended"] <= syntax["signatures"]
    assert all(c["signature"].startswith(("def ", "async def ")) for c in syntax["cases"]) and "syntax:" in out
    for s in report["samples"]:
        assert f"----- {s['mode']}: {s['prompt']!r}" in out


def test_cli_eval_scores_the_whole_split_in_half_window_steps_by_default():
    from dsv4.cli import parser

    opts = parser().parse_args(["eval", "--ckpt", "x"])
    assert (opts.max_tokens, opts.stride, opts.seq_len) == (0, None, None)  # all tokens; stride = seq_len // 2 later


def test_cli_eval_can_skip_everything(ckpt, tmp_path, capsys):
    assert main(["eval", "--ckpt", str(ckpt), "--no-bpb", "--no-samples", "--dtype", "fp32",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "r.json").read_text()) == {"ckpt": str(ckpt)}
