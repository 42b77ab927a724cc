"""Training on several processes (CPU + gloo): `dsv4 train --nproc 2` with FSDP2, and with the routed experts spread
over both ranks, trains as one process does on the same global batch (pretraining and masked fine-tuning, two
micro-batches a step); snapshots saved on 2 ranks resume on 1 and on 2; a killed rank ends the run at once with its
name; the gradients of a sharded model equal one process's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4.train.snapshot import list_snapshots, load_latest
from tests.test_train import VAL_FRAC, corpus  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# per-step losses agree to ~1e-6; the weights to ~7e-5 at this lr: AdamW divides each gradient element by its own
# running RMS, so elements whose gradient is ~1e-8 (the first layer's hyper-connection mixing of four identical
# streams) move by lr * (a ratio the fp32 summation order changes); at lr 5e-3 that reaches ~3e-4
TOLERANCE = 1e-4
LR = "1e-3"


def train_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv4", "train", "--preset", "tiny", "--out", str(out), "--data", str(data),
            "--val-frac", str(VAL_FRAC), "--dtype", "fp32", "--device", "cpu", "--steps", str(STEPS),
            "--batch-size", "2", "--seq-len", "64", "--warmup", "2", "--lr", LR, "--eval-every", "2",
            "--save-every", "2", "--grad-accum", "2", "--sft-steps", "2", "--sft-batch-size", "2", "--sft-seq-len",
            "128", "--compile", "off", "--quiet", *extra]


def train(out: Path, data: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(train_argv(out, data, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir: Path, stage: str = "pretrain") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_run(a: Path, b: Path):
    for stage, steps in (("pretrain", STEPS), ("sft", 2)):  # (fine-tuning: masked answers, ranks' token shares)
        la, lb = losses(a, stage), losses(b, stage)
        assert sorted(lb) == list(range(1, steps + 1)), (stage, lb)
        assert all(abs(la[s] - lb[s]) < TOLERANCE for s in la), (stage, la, lb)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(wa, key=lambda k: (wa[k].float() - wb[k].float()).abs().max().item())
    assert (wa[worst].float() - wb[worst].float()).abs().max().item() < TOLERANCE, worst


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("one") / "run"
    train(out, corpus)
    return out


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("two") / "run"
    train(out, corpus, "--nproc", "2")
    return out


def test_two_ranks_train_like_one_process(one_process, two_ranks):
    assert_same_run(one_process, two_ranks)
    manifest = json.loads((Path(list_snapshots(two_ranks / "pretrain")[-1]) / "manifest.json").read_text())
    assert manifest["format"] == "dcp" and manifest["world"] == 2  # (the snapshots are sharded)


def test_experts_over_two_ranks_train_like_one_process(one_process, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "ep"
    train(out, corpus, "--nproc", "2", "--expert-parallel", "2", "--activation-checkpointing")
    assert_same_run(one_process, out)


@pytest.mark.parametrize("saved, nproc", [("two_ranks", 1), ("two_ranks", 2), ("one_process", 2)])
def test_saved_on_two_ranks_resumes_on_one_and_on_two(request, corpus, tmp_path, saved, nproc):  # noqa: F811
    """(and a one-process snapshot resumes on two ranks)"""
    run = request.getfixturevalue(saved)
    cut = tmp_path / "cut"
    subprocess.run(["cp", "-r", str(run), str(cut)], check=True)
    for later in list_snapshots(cut / "pretrain")[1:]:  # as if killed after the first snapshot (step 2)
        subprocess.run(["rm", "-r", later], check=True)
    subprocess.run(["rm", "-r", str(cut / "final"), str(cut / "sft")], check=True)
    train(cut, corpus, "--resume", *(["--nproc", "2"] if nproc == 2 else []))
    assert_same_run(run, cut)


def test_activation_checkpointing_changes_nothing_in_one_process(one_process, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "ac"
    train(out, corpus, "--activation-checkpointing")
    assert losses(out) == losses(one_process) and losses(out, "sft") == losses(one_process, "sft")
    wa, wb = weights(one_process), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_killed_rank_ends_the_run_quickly_and_names_it(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    argv = train_argv(out, corpus, "--nproc", "2")
    argv[argv.index("--steps") + 1] = "100000"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_snapshots(out / "pretrain") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_snapshots(out / "pretrain"), "no snapshot within 120 s"
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = next((pid for pid in _children(proc.pid) if _rank(pid) == 1), None)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "rank 1 of 2 failed (killed by SIGKILL)" in err, err[-2000:]
    snap = load_latest(out / "pretrain")  # the last snapshot is whole: it loads in one process
    assert snap is not None and snap["step"] >= 2 and "embed.weight" in snap["model"]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc)."""
    parents = {}
    for p in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            parents[p] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def _rank(pid: int) -> int | None:
    try:
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env else None


def test_sharded_gradients_equal_one_process():
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "dist_grads.py")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "fsdp: worst" in res.stdout and "fsdp+ep: worst" in res.stdout


def test_bad_parallel_settings_are_refused_before_anything_starts(corpus, tmp_path, capsys):  # noqa: F811
    from dsv4.cli import main

    argv = train_argv(tmp_path / "x", corpus)[3:]
    assert main([*argv, "--nproc", "2", "--expert-parallel", "3"]) == 2
    assert "--expert-parallel 3 must divide --nproc 2" in capsys.readouterr().err
    assert main([*argv, "--expert-parallel", "2"]) == 2
    assert "--expert-parallel 2 needs as many processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
