"""The `dsv4` command line: `info` prints a table or JSON with the documented keys, and bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4 import save_pretrained
from dsv4.cli import main
from dsv4.config import ModelArgs

ROOT = Path(__file__).resolve().parents[1]


def run_json(capsys, *argv) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_keys(capsys):
    out = run_json(capsys, "--preset", "tiny")
    assert out["name"] == "tiny"
    assert set(out["params"]) == {"main", "mtp"}
    assert {"embedding", "attention", "routed_experts", "shared_experts", "router", "hyper_connections", "norms",
            "head"} <= set(out["params"]["main"])
    assert "mtp_projections" in out["params"]["mtp"]
    for part in ("main", "mtp", "with_mtp"):
        assert set(out["totals"][part]) == {"total", "active"}
    assert out["published_sizes_exclude_mtp"] is True
    assert set(out["flops_per_token"]) == set(out["cache_bytes"]) == {"131072", "1048576"}
    for v in out["flops_per_token"].values():
        assert {"matmul", "attention", "indexer", "total", "mtp", "total_with_mtp"} <= set(v)
    for v in out["cache_bytes"].values():
        assert {"window", "compressed", "indexer", "partial", "total", "per_token", "mtp"} <= set(v)
    assert out["cache_dtype"] == "bfloat16"


def test_info_options(capsys):
    out = run_json(capsys, "--preset", "tiny", "--context", "64", "4096", "--cache-dtype", "fp32")
    assert set(out["cache_bytes"]) == {"64", "4096"}
    assert out["cache_dtype"] == "float32"


def test_info_table(capsys):
    assert main(["info", "--preset", "v4-flash"]) == 0
    table = capsys.readouterr().out
    for needle in ("routed experts", "hyper connections", "with MTP", "284.33B", "128K", "1M", "cache / token"):
        assert needle in table


def test_info_from_checkpoint_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(ModelArgs.from_name("tiny").to_hf_config()))
    out = run_json(capsys, "--ckpt", str(tmp_path))
    assert out["totals"] == run_json(capsys, "--preset", "tiny")["totals"]
    assert out["checkpoint"]["files"] == 0


def test_info_on_a_saved_model(tmp_path, capsys):
    import torch

    from dsv4 import Transformer

    args = ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    save_pretrained(model, tmp_path)
    out = run_json(capsys, "--ckpt", str(tmp_path))
    params = sum(p.numel() for p in model.parameters())
    assert out["totals"]["with_mtp"]["total"] == params
    stored = out["checkpoint"]
    assert stored["files"] >= 1 and stored["elements"] >= params  # plus router buffers (bias, tid2eid)
    assert stored["bytes"] == sum(stored["dtypes"].values())


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["info", "--ckpt", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4 info: error:") and "config.json" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # argparse: unknown preset
        main(["info", "--preset", "v5"])
    assert e.value.code == 2


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "dsv4", "info", "--preset", "v4-pro", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    totals = json.loads(out)["totals"]["main"]
    assert totals["total"] == pytest.approx(1.6e12, rel=0.03) and totals["active"] == pytest.approx(49e9, rel=0.03)
