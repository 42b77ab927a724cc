"""The planner (dsv4.weights.plan) and `dsv4 plan`: its V4-Flash numbers match a hand calculation from the config's
numbers; meta-device dry runs of V4-Flash and V4-Pro on "2x24GB + 256GB RAM" and "1x32GB + 192GB RAM" plan or refuse
as they must; a plan's device map puts every tensor where the plan counted it."""

import json
import math
from pathlib import Path

import pytest
import torch

from dsv4.cli import main
from dsv4.config import ModelArgs
from dsv4.weights.info import count_params, meta_model, prefill_working_set
from dsv4.weights.placement import DeviceMap, materialize, tensor_devices
from dsv4.weights.plan import (
    DoesNotFit,
    Formats,
    Hardware,
    format_bytes,
    format_plan,
    parse_devices,
    parse_size,
    parse_tokens,
    plan,
    unit_path,
)

FLASH, PRO = ModelArgs.from_name("v4-flash"), ModelArgs.from_name("v4-pro")
TWO_CARDS = Hardware(parse_devices("2x24GB"), parse_size("256GB"))
ONE_CARD = Hardware(parse_devices("1x32GB"), parse_size("192GB"))
L = 131072  # 128K


def test_inputs_parse():
    assert parse_devices("2x24GB") == [24 * 10**9] * 2 and parse_devices("24GiB,16GB") == [24 * 2**30, 16 * 10**9]
    assert parse_devices("none") == [] and parse_size("1.5TB") == 1.5e12 and parse_size("256 GB") == 256e9
    assert parse_tokens("128K") == L and parse_tokens("1M") == 2**20 and parse_tokens(4096) == 4096
    for bad in ("2y24GB", "lots"):
        with pytest.raises(ValueError, match="bad"):
            parse_devices(bad)
    with pytest.raises(ValueError, match="unknown experts format"):
        Formats(experts="fp3")


def test_format_bytes():
    assert format_bytes("fp4", (256, 4096, 2048)) * 8 == 256 * 4096 * 2048 * 4.25  # e2m1 + a ue8m0 byte per 32
    assert format_bytes("fp8", (300, 200)) == 300 * 200 + 3 * 2  # a ue8m0 byte per 128x128 block, ragged ones too
    assert format_bytes("int8", (10, 64)) == 640 + 10 * 4 and format_bytes("bf16", (7,)) == 14
    assert format_bytes("int4", (10, 64)) == 320 + 10 * 2 * 2 and format_bytes("int4", (10, 64), group=64) == 340


@pytest.fixture(scope="module")
def flash():
    return plan(FLASH, TWO_CARDS, "128K", name="v4-flash")


@pytest.fixture(scope="module")
def flash_one():
    return plan(FLASH, ONE_CARD, "128K", name="v4-flash")


# --- the hand calculation, from the config's numbers (V4-Flash: D 4096, 64 heads of 512, q/o rank 1024, 8 groups,
# 256 experts of 2048 (6 active), indexer 64 x 128, window 128, hc 4) ---
def fp8(m, n):  # e4m3 + one ue8m0 byte per 128x128 block
    return m * n + math.ceil(m / 128) * math.ceil(n / 128)


def expert_bytes(a):  # one routed expert, fp4: 3 D I weights at 4.25 bits
    return 3 * a.dim * a.moe_inter_dim * 17 // 32


def layer_bytes(a, i):
    """The dense part of layer i: fp8 linear weights, bf16 router, fp32 norms / sinks / hyper-connections / biases."""
    D, H, d, q, g, o, E, F, c = (a.dim, a.n_heads, a.head_dim, a.q_lora_rank, a.o_groups, a.o_lora_rank,
                                 a.n_routed_experts, a.moe_inter_dim, a.index_head_dim)
    m, kind, n = a.compress_ratios[i], a.layer_kind(i), a.hc_mult
    linear = [(q, D), (H * d, q), (d, D), (g * o, H * d // g), (D, g * o), (F, D), (F, D), (D, F)]  # attn, shared
    fp32 = 2 * D + q + d + H + 2 * ((2 + n) * n * n * D + (2 + n) * n + 3)  # norms, sinks, hc_attn / hc_ffn
    if kind == "hca":  # compressor: wkv, wgate; ape [m, d], norm
        linear += [(d, D), (d, D)]
        fp32 += m * d + d
    if kind == "csa":  # overlapping compressor (2d wide) + indexer: wq_b, weights_proj, its own compressor (2c wide)
        linear += [(2 * d, D), (2 * d, D), (a.index_n_heads * c, q), (a.index_n_heads, D), (2 * c, D), (2 * c, D)]
        fp32 += m * 2 * d + d + m * 2 * c + c
    router = 2 * E * D + (a.vocab_size * a.n_activated_experts * 8 if i < a.n_hash_layers else 4 * E)  # tid2eid|bias
    return sum(fp8(*s) for s in linear) + 4 * fp32 + router


def layer_cache(a, i, context, slots=2):
    """The engine's cache of layer i (batch 1 + its spare slot), bf16 entries, fp32 compressor rows."""
    W, d, c, m, kind = a.window_size, a.head_dim, a.index_head_dim, a.compress_ratios[i], a.layer_kind(i)
    n = W * d * 2
    if kind == "hca":
        n += context // m * d * 2 + 2 * m * d * 4
    if kind == "csa":
        n += context // m * (d + c) * 2 + 2 * (2 * m) * (2 * d + 2 * c) * 4
    return slots * n


def cache_read(a, i, context):  # elements one token reads: window, selected / all entries, the indexer's keys
    m, kind, d = a.compress_ratios[i], a.layer_kind(i), a.head_dim
    n = min(a.window_size, context) * d
    if kind == "hca":
        n += context // m * d
    if kind == "csa":
        n += min(a.index_topk, context // m) * d + context // m * a.index_head_dim
    return n


def test_flash_bytes_match_a_hand_calculation(flash):
    a = FLASH
    experts = [u for u in flash.units.values() if u.kind == "experts" and u.layer < a.n_layers]
    assert sum(u.weights for u in experts) == a.n_layers * a.n_routed_experts * 3 * a.dim * a.moe_inter_dim \
        * 4.25 / 8 == 147_169_738_752  # 147 GB of fp4 experts
    for i in range(a.n_layers):
        u = flash.units[f"layers.{i}"]
        assert (u.weights, u.cache) == (layer_bytes(a, i), layer_cache(a, i, L)), i
    head = flash.units["head"]
    assert head.weights == 2 * a.vocab_size * a.dim + 4 * (a.dim + a.hc_mult * a.hc_mult * a.dim + a.hc_mult + 1)
    assert flash.units["embed"].weights == 2 * a.vocab_size * a.dim
    headroom = prefill_working_set(a, L, torch.bfloat16, 512)["total"] + 10**9
    assert flash.memory["accel:0"]["headroom"] == headroom and flash.memory["cpu"]["headroom"] == 8 * 10**9


def test_flash_decode_roofline_matches_a_hand_calculation(flash_one):
    """One 32 GB card (1008 GB/s) and 192 GB of RAM (80 GB/s, 2 TFLOP/s): everything dense on the card, routed experts
    on the CPU except the layers whose experts the card's spare room takes back."""
    a, p, hw = FLASH, flash_one, ONE_CARD
    K, E, D = a.n_activated_experts, a.n_routed_experts, a.dim
    on_card = [i for i in range(a.n_layers) if p.units[f"layers.{i}.ffn.experts"].device == "accel:0"]
    on_cpu = [i for i in range(a.n_layers) if i not in on_card]
    assert all(p.units[f"layers.{i}"].device == "accel:0" for i in range(a.n_layers)) and 0 < len(on_card) < 10
    assert 0 <= p.memory["accel:0"]["free"] < E * expert_bytes(a)  # no room for another layer's experts
    assert on_card == list(range(len(on_card)))  # taken back in layer order
    # the card: dense weights whole + K experts of its expert layers + the cache one token reads + one embedding row
    card = sum(layer_bytes(a, i) + 2 * cache_read(a, i, L) for i in range(a.n_layers)) + 2 * D \
        + len(on_card) * K * expert_bytes(a) + p.units["head"].weights
    # the CPU: K experts per layer, 3 D I weights each, 2 FLOPs a weight
    cpu_bytes, cpu_flops = len(on_cpu) * K * expert_bytes(a), len(on_cpu) * K * 6 * D * a.moe_inter_dim
    assert cpu_bytes / hw.cpu_bandwidth > cpu_flops / hw.cpu_flops  # memory-bound, as on the card
    # PCIe: x (bf16) and weights + indices (fp32 + int64) in, y out: 4 transfers per CPU expert layer
    pcie = len(on_cpu) * ((4 * D + 12 * K) / hw.pcie_bandwidth + 4 * hw.pcie_latency)
    decode = p.roofline["decode"]
    assert decode["devices"]["accel:0"]["bytes"] == pytest.approx(card, rel=1e-12)
    assert decode["devices"]["accel:0"]["bound"] == "memory" and decode["devices"]["cpu"]["bound"] == "memory"
    assert decode["pcie"]["transfers"] == 4 * len(on_cpu)
    step = card / hw.gpu_bandwidth + cpu_bytes / hw.cpu_bandwidth + pcie
    assert decode["tokens_per_s"] == pytest.approx(1 / step, rel=1e-9)
    assert 15 < decode["tokens_per_s"] < 30  # ~21 tokens/s: the CPU's 38 layers of experts dominate


def test_units_agree_with_info(flash):
    parts = count_params(meta_model(FLASH))
    main_flops = sum(c.flops for c in parts["main"].values())
    units = flash.units.values()
    assert sum(u.flops for u in units if u.layer is None or u.layer < FLASH.n_layers) == main_flops
    assert sum(u.params for u in units) == sum(c.total for part in parts.values() for c in part.values())


@pytest.mark.parametrize("args, hardware, fits", [(FLASH, TWO_CARDS, True), (FLASH, ONE_CARD, True),
                                                  (PRO, TWO_CARDS, False), (PRO, ONE_CARD, False)])
def test_dry_runs(args, hardware, fits):
    """V4-Flash's 147 GB of fp4 experts fit 192 or 256 GB of RAM, its ~25 GB of the rest the cards. V4-Pro's routed
    experts alone, 61 x 384 x 3 x 7168 x 3072 = 1.55T weights at 4.25 bits = 822 GB, fit neither: refused."""
    experts = args.n_layers * args.n_routed_experts * 3 * args.dim * args.moe_inter_dim * 4.25 / 8
    if not fits:
        assert experts > 820e9 > hardware.ram
        with pytest.raises(DoesNotFit, match=r"does not fit: host RAM must hold .*routed experts 835.5 GB.* GB short"):
            plan(args, hardware, "128K", name="v4-pro")
        return
    p = plan(args, hardware, "128K", name="v4-flash")
    assert all(m["free"] >= 0 for m in p.memory.values()) and p.memory["cpu"]["weights"] < experts
    assert {u.device for u in p.units.values() if u.kind not in ("experts", "table")} == \
        {f"accel:{i}" for i in range(len(hardware.accelerators))}
    assert 10 < p.roofline["decode"]["tokens_per_s"] < 40 and 50 < p.roofline["prefill"]["tokens_per_s"] < 500
    assert "tokens/s" in format_plan(p) and json.loads(p.to_json())["device_map"] == p.device_map.to_dict()


def test_everything_on_the_cards_when_it_fits():
    p = plan(FLASH, Hardware(parse_devices("8x80GB"), parse_size("64GB")), "128K")
    assert p.policy == "everything on the accelerators" and p.memory["cpu"]["weights"] == 0
    devices = [p.units[f"layers.{i}"].device for i in range(FLASH.n_layers)]
    assert devices == sorted(devices) and len(set(devices)) == 8  # contiguous ranges over all eight
    assert p.roofline["decode"]["tokens_per_s"] > 2 * plan(FLASH, TWO_CARDS).roofline["decode"]["tokens_per_s"]


@pytest.mark.parametrize("args, hardware", [(FLASH, TWO_CARDS), (PRO, Hardware(parse_devices("2x24GB"),
                                                                                parse_size("1TB")))])
def test_a_plans_map_places_every_tensor_where_the_plan_counted_it(args, hardware):
    """The plan's device map, applied by placement.py's code to the model built on meta (meta standing in for each
    device): every parameter and buffer has exactly one device, the one of the unit the plan counted it in."""
    p = plan(args, hardware, "128K")
    model = meta_model(args)
    names = tensor_devices(model, p.device_map)
    assert set(names) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert all(device == p.units[unit_path(name)].device for name, device in names.items())
    placement = materialize(model, p.device_map.with_devices(lambda d: "meta"))
    assert all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))
    cpu_experts = {f"layers.{u.layer}.ffn.experts" for u in p.units.values()
                   if u.kind == "experts" and u.device == "cpu" and u.layer < args.n_layers}
    assert cpu_experts and cpu_experts <= set(placement.boundaries)


def test_cli_plan_json(capsys):
    assert main(["plan", "--model", "v4-flash", "--devices", "2x24GB", "--ram", "256GB", "--context", "128K",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["memory"]) == {"accel:0", "accel:1", "cpu"} and report["device_map"][""] == "accel:0"
    assert report["inputs"]["hardware"]["cpu_bandwidth"] == 80e9 and report["inputs"]["formats"]["experts"] == "fp4"
    assert report["roofline"]["decode"]["tokens_per_s"] > 0 and DeviceMap.parse(report).to_dict() == \
        report["device_map"]


def test_cli_plan_table_and_refusal(capsys):
    assert main(["plan", "--model", "v4-flash", "--devices", "1x32GB", "--ram", "192GB", "--gpu-bandwidth",
                 "2000"]) == 0
    out = capsys.readouterr().out
    assert "accel:0" in out and "2000 GB/s" in out and "decode at 128K, batch 1:" in out
    assert main(["plan", "--model", "v4-pro", "--devices", "1x32GB", "--ram", "192GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dsv4 plan: error: v4-pro does not fit: host RAM must hold" in err and len(err.splitlines()) == 1


def test_cli_plan_reads_a_checkpoints_config(tmp_path, capsys):
    """The release's config.json plans as the preset does; a `dsv4 quantize`d one in its own format."""
    release = json.loads((Path(__file__).parent / "data" / "v4_flash_release_config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(release))
    argv = ["plan", "--ckpt", str(tmp_path), "--devices", "2x24GB", "--ram", "256GB", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_map"] == plan(FLASH, TWO_CARDS).device_map.to_dict()
    release["quantization_config"] = {"quant_method": "dsv4", "format": "int4", "group_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(release))
    assert main(argv) == 0
    formats = json.loads(capsys.readouterr().out)["inputs"]["formats"]
    assert (formats["experts"], formats["weights"], formats["group"]) == ("int4", "int4", 64)
