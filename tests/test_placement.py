"""Placement (dsv4.weights.placement): a placed model computes exactly what the unplaced one does, its hooks really
run at every boundary, the engine decodes through it, the KV cache follows its layers, and bad maps fail clearly."""

import json
from collections import Counter

import pytest
import torch

from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.model.cache import KVCache
from dsv4.model.transformer import Transformer
from dsv4.tokenizers.text import Tokenizer
from dsv4.weights.placement import DeviceMap, Mover, cache_devices, main_device, materialize, place
from tests.helpers import random_ids, random_model, tiny_args
from tests.test_data import FEW

# both on the CPU only (this machine has no accelerator), so the hooks run but move nothing: what the test shows is
# that placement changes no number and that every boundary is crossed
EXPERTS = {"": "cpu", "layers.*.ffn.experts": "cpu"}
SPLIT = {"": "cpu", "embed": "cpu", "layers.0-1": "cpu", "layers.2-3": "cpu", "layers.3.ffn.experts": "cpu",
         "layers.1.ffn.shared_experts": "cpu", "hc_head": "cpu", "norm": "cpu", "head": "cpu", "mtp.0": "cpu",
         "mtp.*.ffn.experts": "cpu"}
# boundary -> calls in one forward with mtp=True (the embedding and head serve the MTP module too)
EXPERTS_CALLS = Counter({f"layers.{i}.ffn.experts": 1 for i in range(4)})
SPLIT_CALLS = Counter({"embed": 2, **{f"layers.{i}": 1 for i in range(4)}, "layers.3.ffn.experts": 1,
                       "layers.1.ffn.shared_experts": 1, "hc_head": 1, "norm": 1, "head": 2, "mtp.0": 1,
                       "mtp.0.ffn.experts": 1, "mtp.0.hc_head": 1, "mtp.0.norm": 1})
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    return random_model(0)


def placed_copy(model: Transformer, device_map):
    """`model`'s weights in a model built on meta and materialized by `device_map` (the loader's path)."""
    with torch.device("meta"):
        fresh = Transformer(model.args)
    placement = materialize(fresh, device_map)
    fresh.load_state_dict(model.state_dict())
    fresh.init_rope()
    return fresh.eval(), placement


@torch.no_grad()
@pytest.mark.parametrize("device_map, calls", [(EXPERTS, EXPERTS_CALLS), (SPLIT, SPLIT_CALLS)])
def test_placed_logits_equal_unplaced(model, device_map, calls):
    ids = random_ids(model.args, 2, 37)
    ref, ref_mtp = model(ids, mtp=True)
    placed, placement = placed_copy(model, device_map)
    assert set(placement.boundaries) == set(calls)
    out, out_mtp = placed(ids, mtp=True)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(out_mtp, ref_mtp, strict=True))
    assert placement.calls == calls  # the hooks ran, once per crossing
    placement.remove()
    placed(ids)
    assert placement.calls == calls  # detached


@torch.no_grad()
def test_place_moves_a_built_model(model):
    ids = random_ids(model.args, 1, 20)
    moved = random_model(0)
    placement = place(moved, EXPERTS)
    assert torch.equal(moved(ids), model(ids)) and placement.calls == Counter({f"layers.{i}.ffn.experts": 1
                                                                               for i in range(4)})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_decodes_the_same_through_a_placed_model(model, tok, speculative):
    prompts = ["def foo(x):\n    return", "import os\n"]
    kw = dict(max_batch=2, prefill_chunk=7, speculative=speculative)
    ref = Engine(random_model(0), tok, **kw).generate(prompts, GREEDY, max_new_tokens=12, ignore_eos=True)
    placed, placement = placed_copy(model, SPLIT)
    engine = Engine(placed, tok, **kw)
    out = engine.generate(prompts, GREEDY, max_new_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    steps = engine.stats["steps"]
    assert placement.calls["layers.3.ffn.experts"] >= steps > 0 and placement.calls["head"] >= steps - 1  # all decode
    assert (placement.calls["mtp.0"] > 0) == speculative


def test_the_cache_follows_its_layers(model):
    args = model.args
    n = args.n_layers + args.n_mtp_layers
    assert cache_devices(model) == [torch.device("cpu")] * n and main_device(model) == torch.device("cpu")
    devices = [torch.device("meta" if i % 2 else "cpu") for i in range(n)]
    cache = KVCache(args, 2, 64, device="cpu", devices=devices)
    for layer, device in zip(cache.layers, devices, strict=True):
        assert {t.device for t in layer.tensors()} == {device}
    with pytest.raises(ValueError, match="one device per main and MTP layer"):
        KVCache(args, 2, 64, devices=devices[:-1])


def test_the_mover_rebuilds_a_step_once_per_device_and_never_copies_a_cache(model):
    cache = KVCache(model.args, 2, 64)
    step = model.make_step(cache, torch.tensor([0, 1]), torch.tensor([3, 5]), 2)
    mover, meta, cpu = Mover(), torch.device("meta"), torch.device("cpu")
    moved = mover(step, meta)
    assert moved is not step and moved.positions.device == meta and moved.valid.device == meta
    assert (moved.width, moved.end, moved.trash) == (step.width, step.end, step.trash) and moved.rotary is step.rotary
    assert mover(step, meta) is moved and mover.moved == 3  # slots, start, length: once
    assert mover((step, [cache.main[0]]), cpu)[0] is step  # nothing to move: the very objects
    x = mover({"a": torch.ones(2), "b": (torch.ones(1), 3)}, meta)
    assert x["a"].device == meta and x["b"][0].device == meta and x["b"][1] == 3
    with pytest.raises(ValueError, match="cache_devices"):
        mover(cache.main[1], meta)


def test_the_most_specific_key_wins(tmp_path):
    dm = DeviceMap.parse('{"": "cpu", "layers.*": "meta", "layers.0-20": "cpu", "layers.5": "meta", '
                         '"layers.*.ffn.experts": "cpu"}')
    assert dm.key_of("layers.30.attn.wq_a.weight") == "layers.*"
    assert dm.key_of("layers.7") == "layers.0-20" and dm.key_of("layers.5.attn") == "layers.5"
    assert dm.key_of("layers.5.ffn.experts.w13") == "layers.*.ffn.experts"
    assert dm.key_of("mtp.0.ffn") == "" and dm.key_of("hc_head.fn") == "" and dm.key_of("head.weight") == ""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"model": "x", "device_map": dm.to_dict()}))  # a `dsv4 plan --json` report reads too
    assert DeviceMap.parse(str(path)).to_dict() == dm.to_dict() == json.loads(json.dumps(dm.to_dict()))


@pytest.mark.parametrize("entries, message", [
    ({"layers.*.ffn.experts": "cpu"}, 'needs a default entry ""'),
    ({"": "cpu", "layers.1.attn": "cpu"}, "'layers.1.attn' is not a placeable module"),
    ({"": "cpu", "layers": "cpu"}, "'layers' is not a placeable module"),
    ({"": "gpu7"}, "bad device 'gpu7'"),
    ({"": "cpu", "layers.1": "cpu:x"}, "bad device 'cpu:x'"),
])
def test_a_malformed_map_fails_at_once(entries, message):
    with pytest.raises(ValueError, match=message):
        DeviceMap(entries)


@pytest.mark.parametrize("entries, message", [
    ({"": "cpu", "layers.9": "cpu"}, "'layers.9' names no module of this model"),
    ({"": "cpu", "layers.1.engram": "cpu"}, "'layers.1.engram' names no module"),  # tiny has no Engram
    ({"": "cpu", "layers.0-2": "cpu", "layers.1-3": "cpu"}, "equally specific"),
    ({"": "cpu", "head": "meta"} if torch.accelerator.current_accelerator() else {"": "accel:0"}, "accelerator|tied"),
])
def test_a_map_that_does_not_fit_the_model_fails(entries, message):
    with torch.device("meta"):
        fresh = Transformer(tiny_args(tie_embeddings=torch.accelerator.current_accelerator() is not None))
    with pytest.raises(ValueError, match=message):
        materialize(fresh, entries)


def test_a_tied_head_stays_with_its_embedding():
    with torch.device("meta"):
        fresh = Transformer(tiny_args(tie_embeddings=True))
    with pytest.raises(ValueError, match="tied"):
        materialize(fresh, {"": "cpu", "head": "meta"})
    materialize(fresh, {"": "cpu", "embed": "meta", "head": "meta"})
    assert fresh.head.weight is fresh.embed.weight and fresh.head.weight.device.type == "meta"
    assert fresh.layers[0].attn.wq_a.weight.device.type == "cpu"
