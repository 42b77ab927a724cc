"""Loading into a placement (issue 23): `from_pretrained(device_map=)` streams a checkpoint straight into the placed
tensors and computes what the unplaced model does; the engine builds its cache where the layers are; `load_model`
and `dsv4 generate --device-map` take "auto" (dsv4.weights.plan for this machine), a map, a file or a plan's report.
This machine has no accelerator, so every device is the CPU: the hooks run (counted) but move nothing."""

import json
from collections import Counter

import pytest
import torch

from dsv4 import save_pretrained
from dsv4.cli import main
from dsv4.engine import engine as engine_module
from dsv4.engine.engine import Engine
from dsv4.engine.load import load_model
from dsv4.engine.sampling import SamplingParams
from dsv4.weights import checkpoint
from dsv4.weights.checkpoint import from_pretrained, load_checkpoint
from dsv4.weights.convert import quantize_checkpoint
from tests.helpers import random_ids, random_model
from tests.test_engine import ckpt, model, tok  # the tiny model and tokenizer, saved as a checkpoint directory

EXPERTS_HEAD = {"": "cpu", "layers.*.ffn.experts": "cpu", "head": "cpu"}
SPLIT = {"": "cpu", "layers.2-3": "cpu", "layers.*.ffn.experts": "cpu", "head": "cpu", "mtp.0": "cpu"}
GREEDY = SamplingParams(temperature=0)
PROMPTS = ["def foo(x):\n    return", "import os\n"]


def greedy(model, tok, **kw):
    engine = Engine(model, tok, max_batch=2, prefill_chunk=7, **kw)
    return [c.token_ids for c in engine.generate(PROMPTS, GREEDY, max_new_tokens=10, ignore_eos=True)], engine


@torch.no_grad()
def test_a_mapped_load_computes_the_same_and_crosses_its_boundaries(ckpt, model):
    ids = random_ids(model.args, 2, 29)
    plain = from_pretrained(ckpt).eval()
    placed = from_pretrained(ckpt, device_map=EXPERTS_HEAD).eval()
    assert plain.placement is None
    boundaries = {*(f"layers.{i}.ffn.experts" for i in range(4)), "head"}
    assert set(placed.placement.boundaries) == boundaries
    assert torch.equal(placed(ids), plain(ids)) and torch.equal(plain(ids), model(ids))
    assert placed.placement.calls == Counter(dict.fromkeys(boundaries, 1))  # every boundary crossed, once
    with pytest.raises(ValueError, match="not both"):
        from_pretrained(ckpt, device="cpu", device_map=EXPERTS_HEAD)


def test_loading_streams_into_the_materialized_tensors(ckpt, monkeypatch):
    """No second copy of the model: the loader never builds the model whole on a device (no to_empty), and every
    tensor load_into fills is the very storage `materialize` gave it (same data_ptr before and after)."""
    before, after = {}, {}
    real_load_into = checkpoint.load_into

    def load_into(model, *args, **kwargs):
        before.update({n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()})
        assert all(t.device.type == "cpu" for t in model.state_dict().values())
        real_load_into(model, *args, **kwargs)
        after.update({n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()})

    def to_empty(*_):
        raise AssertionError("a mapped load must not to_empty the whole model")

    monkeypatch.setattr(checkpoint, "load_into", load_into)
    monkeypatch.setattr(checkpoint, "_to_empty", to_empty)
    from_pretrained(ckpt, device_map=SPLIT)
    assert before and after == before


@torch.no_grad()
def test_engram_tables_the_map_puts_on_the_cpu_stay_mapped(tmp_path, tok, monkeypatch):
    model = random_model(0, engram_layers=[1], engram_vocab=[97, 101], engram_dim=32, engram_heads=2)
    save_pretrained(model, tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    mapped, real = [], checkpoint._mmap_entry
    monkeypatch.setattr(checkpoint, "_mmap_entry", lambda path, entry, name: mapped.append(name) or
                        real(path, entry, name))
    placed, _ = load_checkpoint(tmp_path, device_map={"": "cpu", "layers.1.engram.table": "cpu"},
                                experts_mmap=False)
    assert len(mapped) == 1 and "engram.table" in mapped[0]
    assert "layers.1.engram.table" in placed.placement.boundaries
    ids = random_ids(model.args, 1, 23)
    assert torch.equal(placed(ids), model(ids))


@torch.no_grad()
def test_routed_experts_on_the_cpu_stay_in_their_files(tmp_path, ckpt, monkeypatch):
    """Experts stored whole in the dtype the model keeps (a `dsv4 quantize`d checkpoint's codes and scales) and placed
    on the CPU are memory-mapped, not read, and compute what read ones do; a load that casts them reads them."""
    quantize_checkpoint(ckpt, tmp_path / "q", "int8", progress=False)
    mapped, real = [], checkpoint._mmap_entry
    monkeypatch.setattr(checkpoint, "_mmap_entry", lambda path, entry, name: mapped.append(name) or
                        real(path, entry, name))
    placed, _ = load_checkpoint(tmp_path / "q", device_map=EXPERTS_HEAD)
    experts = {n for n in placed.state_dict() if ".experts.w" in n}
    assert set(mapped) == experts and len(experts) == 4 * (len(placed.layers) + len(placed.mtp))
    assert not placed.layers[0].ffn.experts.w13.untyped_storage().resizable()  # the file's pages, not our memory
    read, _ = load_checkpoint(tmp_path / "q", experts_mmap=False)
    assert read.layers[0].ffn.experts.w13.untyped_storage().resizable()
    ids = random_ids(placed.args, 2, 19)
    assert torch.equal(placed(ids), read(ids))
    mapped.clear()
    load_checkpoint(ckpt, dtype=torch.bfloat16)  # fp32 experts stored, bf16 kept: read and cast
    assert not mapped


def test_a_map_for_mtp_loads_a_checkpoint_without_it(tmp_path):
    """A checkpoint without MTP weights (as transformers writes them) loads without the module; its map entries go."""
    model = random_model(0, n_mtp_layers=0, compress_ratios=[0, 4, 16, 4])
    save_pretrained(model, tmp_path, layout="upstream")  # our config names: easy to claim an MTP module
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_mtp_layers": 1,
                                                      "compress_ratios": [0, 4, 16, 4, 0]}))
    with pytest.warns(UserWarning, match="no MTP weights"):
        placed = from_pretrained(tmp_path, device_map=SPLIT)
    assert not placed.mtp and "mtp.0" not in placed.placement.device_map.entries


def test_the_engine_puts_the_cache_on_the_layers_devices(ckpt, tok, monkeypatch):
    asked = []
    real = engine_module.cache_devices
    monkeypatch.setattr(engine_module, "cache_devices", lambda m: asked.append(m) or real(m))
    ref, _ = greedy(from_pretrained(ckpt).eval(), tok, speculative=True)
    assert not asked  # an unplaced model: the cache as before, every layer on the engine's device
    placed = from_pretrained(ckpt, device_map=SPLIT).eval()
    out, engine = greedy(placed, tok, speculative=True)
    assert asked == [placed] and out == ref
    assert [layer.window.device for layer in engine.cache.layers] == real(placed)
    assert engine.device == torch.device("cpu")
    steps = engine.stats["steps"]
    assert placed.placement.calls["layers.2"] >= steps > 0 and placed.placement.calls["mtp.0"] > 0


def test_load_model_auto_plans_for_this_machine(ckpt, tok, capsys):
    plain, _ = load_model(ckpt, "cpu", "fp32")
    auto, _ = load_model(ckpt, dtype="fp32", device_map="auto", max_len=256, max_batch=2)
    err = capsys.readouterr().err
    assert "device map auto: no accelerator: everything on the CPU (context 256, batch 2" in err
    assert "--device-map '{\"\": \"cpu\"}'" in err
    assert auto.placement.device_map.to_dict() == {"": "cpu"} and not auto.placement.boundaries
    assert greedy(auto, tok)[0] == greedy(plain, tok)[0]
    with pytest.raises(ValueError, match="not both"):
        load_model(ckpt, "cpu", device_map="auto")


def generate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *argv, "def foo(x):", "--max-new-tokens", "5", "--dtype", "fp32", "--no-compile"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_with_a_device_map(ckpt, capsys, tmp_path):
    code, plain, _ = generate(capsys, "--ckpt", str(ckpt))
    assert code == 0 and plain.strip()
    code, auto, err = generate(capsys, "--ckpt", str(ckpt), "--device-map", "auto")
    assert code == 0 and auto == plain and "device map auto:" in err
    assert main(["plan", "--ckpt", str(ckpt), "--devices", "none", "--ram", "64GB", "--context", "4096", "--json"]) == 0
    (tmp_path / "plan.json").write_text(capsys.readouterr().out)  # a plan's report is a map too
    for spec in (str(tmp_path / "plan.json"), json.dumps(SPLIT)):
        assert generate(capsys, "--ckpt", str(ckpt), "--device-map", spec)[:2] == (0, plain)
    for spec, why in (('{"layers.0": "cpu"}', 'needs a default entry ""'), ("missing.json", "neither a JSON object"),
                      ('{"": "accel:0"}', "needs an accelerator"), ('{"": "cpu", "layers.9": "cpu"}', "names no")):
        code, _, err = generate(capsys, "--ckpt", str(ckpt), "--device-map", spec)
        assert code == 2 and err.startswith("dsv4 generate: error: device map") and why in err
        assert len(err.splitlines()) == 1
    code, _, err = generate(capsys, "--ckpt", str(ckpt), "--device-map", "auto", "--device", "cpu")
    assert code == 2 and "not both" in err and len(err.splitlines()) == 1


def test_cli_generate_auto_on_a_quantized_checkpoint(ckpt, capsys, tmp_path):
    quantize_checkpoint(ckpt, tmp_path / "int8", "int8")
    code, plain, _ = generate(capsys, "--ckpt", str(tmp_path / "int8"))
    assert code == 0 and plain.strip()
    code, auto, err = generate(capsys, "--ckpt", str(tmp_path / "int8"), "--device-map", "auto")
    assert code == 0 and auto == plain and "weights int8, routed experts int8" in err
