"""The trainer: exact resume after a real kill (and after a corrupted snapshot), mixed precision with fp32 masters,
gradient accumulation, indexer stages, the one-command pipeline and `dsv4 eval` on what it writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from dsv4.config import ModelArgs
from dsv4.data.corpus import split_by_key
from dsv4.eval.complete import complete
from dsv4.train.config import StageConfig, TrainConfig
from dsv4.train.optim import wsd_schedule
from dsv4.train.pipeline import build_model, run
from dsv4.train.plots import read_metrics
from dsv4.train.precision import MixedPrecision
from dsv4.train.trainer import Trainer
from tests.helpers import FEW_SINKHORN, random_model

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ("textwrap.py", "bisect.py", "colorsys.py", "keyword.py", "heapq.py", "fnmatch.py", "glob.py",
         "shlex.py", "calendar.py", "string.py", "numbers.py", "copy.py")
VAL_FRAC = 0.3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        shutil.copy(STDLIB / name, root / name)
    train, val = split_by_key(list(FILES), VAL_FRAC)
    assert train and val  # the split is a pure function of the names: both sides are non-empty
    return root


def train_argv(out: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv4", "train", "--preset", "tiny", "--out", str(out), "--data", str(data),
            "--val-frac", str(VAL_FRAC), "--dtype", "fp32", "--device", "cpu", "--steps", str(steps),
            "--batch-size", "2", "--seq-len", "64", "--warmup", "3", "--indexer-warmup", "6", "--eval-every", "5",
            "--save-every", "4", "--sft-steps", "0", "--compile", "off", "--quiet", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "pretrain" / "metrics.jsonl")}


@pytest.mark.slow
def test_killed_run_resumes_exactly_even_from_a_corrupt_snapshot(corpus, tmp_path):
    steps = 40
    full = tmp_path / "full"
    subprocess.run(train_argv(full, corpus, steps), check=True, cwd=ROOT, capture_output=True)
    expected = losses(full)
    assert sorted(expected) == list(range(1, steps + 1))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_argv(cut, corpus, steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second = cut / "pretrain" / "step-000000008"
    deadline = time.time() + 300
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "final").exists()
    killed_at = max(losses(cut))
    assert 8 <= killed_at < steps

    # truncate the newest snapshot as a crash mid-write on a non-atomic filesystem might: resume must notice,
    # say so, and continue from the previous good one
    newest = sorted((cut / "pretrain").glob("step-*"))[-1]
    weights = newest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 3)
    res = subprocess.run(train_argv(cut, corpus, steps, "--resume"), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "does not match its checksum" in res.stderr and "falling back to the previous snapshot" in res.stderr
    assert losses(cut) == expected  # bit-identical losses for every step, before and after the kill
    rows = read_metrics(cut / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # rows of the lost steps were replaced, not doubled
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.3  # and it learned something
    assert (cut / "final" / "DONE").exists()


def test_pipeline_writes_a_loadable_checkpoint_and_eval_reads_it(corpus, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(out, corpus, 6)
    argv[argv.index("--sft-steps") + 1] = "3"
    argv += ["--sft-seq-len", "256", "--sft-batch-size", "2", "--dtype", "bf16"]
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True)
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "tokenizer.json", "train_config.json", "model.safetensors.index.json", "DONE",
            "pretrain_loss.png", "pretrain_lr.png", "pretrain_expert_load.png", "sft_loss.png"} <= names
    sft_rows = read_metrics(out / "sft" / "metrics.jsonl")
    # answers only, never empty
    assert [r["step"] for r in sft_rows] == [1, 2, 3] and all(r["ce"] > 0 for r in sft_rows)
    pre_rows = read_metrics(out / "pretrain" / "metrics.jsonl")
    assert all("indexer_kl" in r and "mtp_ce" in r for r in pre_rows)
    assert pre_rows[-1]["expert_load"] and len(pre_rows[-1]["expert_load"]["1"]) == 8

    # rerunning reuses the finished run; running without --resume refuses to overwrite it
    again = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "reusing it" in again.stdout
    clash = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert clash.returncode == 2 and "already holds a finished run" in clash.stderr

    report = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, "-m", "dsv4", "eval", "--ckpt", str(final), "--json", str(report),
                          "--max-tokens", "2000"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads(report.read_text())
    assert 0 < r["bpb"]["bpb"] < 20 and 0 < r["bpb"]["bigram_bpb"] < 20
    assert 1900 < r["bpb"]["val_tokens"] <= 2000  # eos targets carry no bytes
    assert len(r["samples"]) == 4 and "held-out bits per byte" in res.stdout


def test_resume_with_a_different_configuration_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), preset="tiny", data=str(corpus), val_frac=VAL_FRAC, dtype="fp32", device="cpu",
                      compile="off",
                      pretrain=StageConfig(steps=2, batch_size=2, seq_len=32, save_every=1, eval_every=1,
                                           eval_batches=1),
                      sft=StageConfig(steps=0))
    run(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds a finished run"):
        run(cfg, progress=False)
    shutil.rmtree(out / "final")
    cfg.pretrain.lr = 1e-2
    with pytest.raises(ValueError, match=r"pretrain changed"):
        run(cfg, resume=True, progress=False)


# ---- in-process pieces ----
def fixed_batches(args: ModelArgs, n: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, args.vocab_size, (n, batch, seq + 1), generator=g)
    return lambda start: iter([(b[:, :-1], b[:, 1:]) for b in data[start:]])


def make_trainer(tmp_path, batch_size, grad_accum, dtype=torch.float32, **kw):
    args = ModelArgs.from_name("tiny")
    model = build_model(args, torch.device("cpu"), seed=0)
    kw = {"steps": 3, **kw}
    cfg = StageConfig(batch_size=batch_size, grad_accum=grad_accum, seq_len=32, warmup=1, eval_every=100,
                      save_every=100, **kw)
    data = fixed_batches(args, 8, 4, 32)
    # the same 4 sequences per optimizer step, split into micro-batches of batch_size
    micro = lambda start: (tuple(t[i:i + batch_size] for t in b) for b in data(start // grad_accum)  # noqa: E731
                           for i in range(0, 4, batch_size))
    return Trainer(model, cfg, tmp_path, micro, [], dtype, progress=False)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    grads = {}
    for key, (batch, accum) in {"whole": (4, 1), "split": (2, 2)}.items():
        t = make_trainer(tmp_path / key, batch, accum, steps=1)
        step = t.optimizer.step
        t.optimizer.step = lambda t=t, step=step, key=key: (grads.__setitem__(key, [p.grad.clone() for p in t.params
                                                                                      if p.grad is not None]), step())
        t.fit()
        grads[key + "_loss"] = read_metrics(t.metrics_path)[0]["loss"]
        grads[key + "_bias"] = torch.cat([m.gate.bias for m in t.moes if not m.gate.hashed])
    assert len(grads["whole"]) == len(grads["split"]) > 20
    for a, b in zip(grads["whole"], grads["split"]):  # the clipped fp32 gradient of the 4-sequence batch
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert abs(grads["whole_loss"] - grads["split_loss"]) < 1e-5
    # the aux-loss-free bias moved, by the same steps, from the load summed over both micro-batches
    assert grads["whole_bias"].abs().sum() > 0 and torch.equal(grads["whole_bias"], grads["split_bias"])


def test_the_trainer_decays_the_lr_over_decay_frac_of_the_steps(tmp_path):
    for frac in (0.25, 0.5):
        t = make_trainer(tmp_path / str(frac), 4, 1, steps=8, schedule="wsd", decay_frac=frac, lr=1e-3)
        t.fit()
        lrs = [r["lr"] for r in read_metrics(t.metrics_path)]
        decay = 8 - int(frac * 8)  # the peak from step 1 through the decay's first step, then linear down
        assert lrs[1:decay + 1] == [pytest.approx(1e-3)] * decay and lrs[decay + 1] < 1e-3
        assert lrs == [pytest.approx(1e-3 * wsd_schedule(s, 1, 8, frac, 0.1)) for s in range(8)]


def test_mixed_precision_keeps_fp32_masters(tmp_path):
    model = random_model(seed=3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mp = MixedPrecision(model, torch.bfloat16)
    assert model.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    assert model.layers[0].hc_attn.fn.dtype == torch.float32  # the release's fp32 parameters stay fp32
    w = model.layers[0].attn.wq_a.weight
    m = mp.master(w)
    assert m.dtype == torch.float32 and torch.equal(m, before["layers.0.attn.wq_a.weight"])  # not cast-then-widened
    # updates far below bf16's resolution accumulate in the master and eventually move the compute weight
    with torch.no_grad():
        for _ in range(64):
            m.add_(m.abs() * 2 ** -12)
    assert not torch.equal(m, before["layers.0.attn.wq_a.weight"])
    mp.sync()
    assert torch.equal(w, m.to(torch.bfloat16))
    sd = mp.state_dict(model)
    assert sd["layers.0.attn.wq_a.weight"].dtype == torch.float32 and torch.equal(sd["layers.0.attn.wq_a.weight"], m)


def test_indexer_runs_dense_then_sparse(tmp_path):
    t = make_trainer(tmp_path, 4, 1, indexer_warmup=2)
    seen = []
    step = t.train_step

    def spy(micro):
        row = step(micro)
        seen.append(t.stage)
        return row
    t.train_step = spy
    t.fit()
    assert seen == ["dense", "dense", "sparse"]
    rows = read_metrics(t.metrics_path)
    assert all(r["indexer_kl"] >= 0 for r in rows) and all("balance_loss" in r for r in rows)


def test_batched_completion_equals_one_at_a_time():
    from dsv4.tokenizers.text import Tokenizer

    tok = Tokenizer.train([(STDLIB / f).read_text() for f in FILES[:4]], vocab_size=512, n_vis=4)
    model = random_model(seed=2, vocab_size=512, max_seq_len=256)
    prompts = ["def f(x):", "import os\nclass A:\n    def g(self", "x = 1"]
    together = complete(model, tok, prompts, max_new_tokens=12, batch_size=3)
    alone = [complete(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone and all(together)
    sampled = complete(model, tok, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    assert sampled == complete(model, tok, prompts, max_new_tokens=12, temperature=1.0, seed=7)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    from dsv4.kernels.compile import compile_blocks
    from dsv4.model.stats import TrainStats
    from dsv4.train.loss import training_loss

    results = []
    for compiled in (False, True):
        model = random_model(seed=4, **FEW_SINKHORN).train()
        if compiled:
            compile_blocks(model)
        ids = torch.randint(0, model.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
        loss, metrics = training_loss(model, ids[:, :-1], ids[:, 1:], mtp_weight=0.3, aux_alpha=1e-3,
                                      stats=TrainStats(indexer="sparse", balance=True), compiled=compiled)
        loss.backward()
        results.append((loss.item(), metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_m, eager_g), (comp_loss, comp_m, comp_g) = results
    assert abs(eager_loss - comp_loss) < 1e-4 and eager_m.keys() == comp_m.keys()
    assert eager_g.keys() == comp_g.keys()
    for name, g in eager_g.items():
        torch.testing.assert_close(comp_g[name], g, atol=1e-4, rtol=1e-3, msg=name)
