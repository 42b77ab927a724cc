"""Where a DeepSeek-V4 model can run on a machine, and about how fast (issue 23): placement, memory per device and a
roofline estimate, all computed on the `meta` device before a byte is loaded (`dsv4 plan`).

Inputs, all stated in the output: the accelerators (memory each), host RAM, the context L, the batch B (sequences
decoding together), a weight format per role, the KV-cache dtype, and per device kind a memory bandwidth and a peak
FLOP/s, plus PCIe bandwidth and a latency per transfer (defaults: an RTX 4090-class card 1008 GB/s and 165 TFLOP/s
bf16 dense, a DDR5 host 80 GB/s and 2 TFLOP/s, PCIe 4.0 x16 25 GB/s and 10 us a transfer). 1 GB = 10^9 bytes.

Bytes of a weight [E, M, N] (E stacked experts, else 1) in a format:
    bf16  2 E M N         fp8  E (M N + ceil(M/128) ceil(N/128))    e4m3, one ue8m0 byte per 128x128 block
    fp4   E (M N / 2 + M ceil(N/32))                                 e2m1, one ue8m0 byte per 32 inputs: 4.25 bits
    int8  E (M N + 4 M)   (an fp32 scale per row)                    int4  E (M N / 2 + 2 M ceil(N/g)) (bf16 per g)
Roles, defaults as the release stores them: routed experts fp4; every other Linear weight (attention, compressors,
indexer, shared experts, MTP and Engram projections) fp8; embedding and head bf16; the rest (router, norms,
hyper-connections, sinks, position biases, Engram tables, buffers) as the model keeps it: bf16, fp32 where the
release keeps fp32. KV cache: what the engine's KVCache allocates for B sequences of L tokens: B + 1 slots (the
engine's spare slot takes masked writes), per layer, compressor rows in fp32.

Placement (the llama.cpp / ktransformers split; headroom per accelerator: the working set of one prefill chunk,
dsv4.weights.info.prefill_working_set, + 1 GB of runtime; host: 8 GB):
  1. The model in dataflow order (embedding; each layer with its experts and KV cache; head; MTP) split into
     contiguous ranges over the accelerators in proportion to their free memory. If it all fits, that is the plan.
  2. Else routed experts and Engram tables go to host RAM and compute there (at batch 1, moving expert weights over
     PCIe is slower than computing on the CPU); the rest is split the same way; layers that still do not fit run on
     the CPU (the tail of the stack).
  3. Spare accelerator memory takes whole layers' routed experts back, on their layer's device, in layer order.
  4. Host RAM must hold its share plus headroom, else the plan is refused, naming what does not fit and by how much.

Roofline. A token passes through the devices one after the other, so their times add:
    t = sum over devices d of max(bytes_d / bandwidth_d, flops_d / peak_d) + t_pcie
  decode step of B tokens (each sequence at position L):  tokens/s = B / t
    bytes_d  dense weights on d (read whole once per step) + routed experts touched: of E per layer,
             E (1 - (1 - K/E)^B) (K at B = 1) + embedding and Engram rows read + B x the cache one token reads:
             per layer min(W, L) d (window) + HCA (L // m) d + CSA min(topk, L // m) d + (L // m) c (indexer scan)
    flops_d  B x (2 x active matmul params on d + attention and indexer FLOPs at L, dsv4.weights.info)
  prefill of a prompt of L tokens in chunks of C, each at the mean position L/2:  tokens/s = L / (ceil(L / C) t)
    with B -> C tokens (experts touched E (1 - (1 - K/E)^C): all of them at C = 512, so read once per chunk), the
    cache read once per chunk, and no head (the engine computes logits at the prompt's last position only).
  t_pcie = bytes crossing / PCIe bandwidth + transfers x latency, from the placement's boundaries (the hooks of
  dsv4.weights.placement): the streams (n x D fp32 per token) where the device changes from layer to layer and back
  home after the last; the token ids for each layer off the model's device (and the step's indices once per
  device); x (bf16), routing weights and indices into routed experts off their layer's device and y back (4
  transfers, 4D + 12K bytes per token); an Engram table's rows; the head's input and logits (6 transfers).
MTP modules are placed but left out of the roofline (they run only when decoding speculatively). The devices never
overlap in this model (ktransformers overlaps the shared expert with the CPU's routed ones), and a device reaches its
roofline only with kernels that compute on the stored formats.
"""

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field

import torch

from dsv4.config import ModelArgs
from dsv4.device import accelerator, device_count, memory_stats
from dsv4.model.cache import KVCache
from dsv4.model.moe import Experts
from dsv4.weights.info import attention_flops, human, meta_model, prefill_working_set, tokens
from dsv4.weights.placement import DeviceMap

GB = 10**9
FORMATS = ("fp32", "bf16", "fp16", "fp8", "fp4", "int8", "int4")
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OFFLOADED = ("experts", "table")  # what goes to host RAM when the model does not fit the accelerators
_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


# --- inputs ---
def parse_size(text: str | int) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '1.5TB', '512' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 24GB, 24GiB, 1.5TB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def parse_devices(text: str) -> list[int]:
    """'2x24GB' -> two of 24 GB; '24GB,16GB'; '24GB'; 'none' or '0' -> no accelerator."""
    text = text.strip().lower()
    if text in ("", "0", "none", "cpu"):
        return []
    out = []
    for part in text.split(","):
        count, _, size = part.strip().rpartition("x")
        if count and not count.strip().isdigit():
            raise ValueError(f"bad --devices {text!r}: use e.g. 2x24GB, 24GB,16GB or none")
        out += [parse_size(size)] * int(count or 1)
    return out


def parse_tokens(text: str | int) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '4096' -> 4096."""
    m = re.match(r"^\s*(\d+)\s*([KM]?)\s*$", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad token count {text!r}: use e.g. 4096, 128K, 1M")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20}[m.group(2).lower()]


@dataclass
class Formats:
    experts: str = "fp4"  # routed experts
    weights: str = "fp8"  # every other Linear weight
    embed: str = "bf16"  # embedding and head
    cache: str = "bf16"  # KV cache dtype
    group: int = 32  # int4: inputs per scale

    def __post_init__(self):
        for role in ("experts", "weights", "embed"):
            if getattr(self, role) not in FORMATS:
                raise ValueError(f"unknown {role} format {getattr(self, role)!r}; choose one of {', '.join(FORMATS)}")
        if self.cache not in CACHE_DTYPES:
            raise ValueError(f"unknown cache dtype {self.cache!r}; choose one of {', '.join(CACHE_DTYPES)}")


@dataclass
class Hardware:
    accelerators: list[int] = field(default_factory=list)  # memory of each, bytes
    ram: int = 0  # host memory, bytes
    gpu_bandwidth: float = 1008e9  # bytes/s (an RTX 4090)
    gpu_flops: float = 165e12  # FLOP/s, bf16 dense (an RTX 4090)
    cpu_bandwidth: float = 80e9  # bytes/s (dual-channel DDR5)
    cpu_flops: float = 2e12  # FLOP/s
    pcie_bandwidth: float = 25e9  # bytes/s (PCIe 4.0 x16)
    pcie_latency: float = 10e-6  # seconds per transfer (and its synchronisation)
    headroom: int | None = None  # per accelerator; None: a prefill chunk's working set + 1 GB
    ram_headroom: int = 8 * GB

    def rates(self, device: str) -> tuple[float, float]:
        return (self.cpu_bandwidth, self.cpu_flops) if device == "cpu" else (self.gpu_bandwidth, self.gpu_flops)


def local_memory() -> tuple[list[int], int]:
    """This machine's (free memory of each accelerator, available host RAM), from dsv4.device."""
    acc = accelerator()
    cards = [] if acc is None else [memory_stats(torch.device(acc.type, i)) for i in range(device_count(acc.type))]
    return [m.free or m.total or 0 for m in cards], memory_stats("cpu").free or 0


def format_bytes(fmt: str, shape, group: int = 32) -> int:
    """Bytes of a weight of `shape` ([.., M, N]) stored in `fmt` (see the module docstring)."""
    *lead, m, n = (1, *shape) if len(shape) == 1 else shape
    e = math.prod(lead)
    if fmt in ("fp32", "bf16", "fp16"):
        return e * m * n * (4 if fmt == "fp32" else 2)
    per = {"fp8": m * n + math.ceil(m / 128) * math.ceil(n / 128), "fp4": math.ceil(m * n / 2) + m * math.ceil(n / 32),
           "int8": m * n + 4 * m, "int4": math.ceil(m * n / 2) + 2 * m * math.ceil(n / group)}[fmt]
    return e * per


# --- the model in placeable units ---
@dataclass
class Unit:
    path: str  # "", "embed", "layers.3", "layers.3.ffn.experts", "layers.1.engram.table", "head", "mtp.0", ...
    kind: str  # root | embed | layer | experts | table | head
    layer: int | None = None  # main layers 0..n-1, then MTP layers
    params: int = 0
    weights: int = 0  # bytes at the plan's formats
    cache: int = 0  # KV-cache bytes (layers)
    flops: int = 0  # matmul FLOPs per token (routed experts: K of E)
    device: str = "cpu"

    @property
    def size(self) -> int:
        return self.weights + self.cache


def unit_path(name: str) -> str:
    c = name.split(".")
    if c[0] in ("layers", "mtp"):
        return ".".join(c[:4]) if c[2:4] in (["ffn", "experts"], ["engram", "table"]) else ".".join(c[:2])
    return {"embed": "embed", "head": "head", "norm": "head", "hc_head": "head"}.get(c[0], "")


def layer_path(args: ModelArgs, i: int) -> str:
    return f"layers.{i}" if i < args.n_layers else f"mtp.{i - args.n_layers}"


def model_units(args: ModelArgs, formats: Formats, context: int, batch: int) -> dict[str, Unit]:
    """Every placeable unit with its bytes (weights at `formats`, the engine's cache) and matmul FLOPs per token."""
    model = meta_model(args).to_dtype(torch.bfloat16)
    owners = dict(model.named_modules())
    units: dict[str, Unit] = {}

    def unit(path: str) -> Unit:
        if path not in units:
            c = path.split(".")
            kind = {"": "root", "embed": "embed", "head": "head"}.get(path) or \
                ("experts" if c[-1] == "experts" else "table" if c[-1] == "table" else "layer")
            units[path] = Unit(path, kind, None if len(c) < 2 else int(c[1]) + (c[0] == "mtp") * args.n_layers)
        return units[path]

    for name, p in model.named_parameters():  # a tied head comes once, with the embedding
        owner, u = owners[name.rpartition(".")[0]], unit(unit_path(name))
        fmt = formats.experts if isinstance(owner, Experts) else formats.embed if name in (
            "embed.weight", "head.weight") else formats.weights if isinstance(owner, torch.nn.Linear) else None
        u.params += p.numel()
        u.weights += p.numel() * p.element_size() if fmt is None else format_bytes(fmt, p.shape, formats.group)
        if p.dim() >= 2 and u.kind not in ("embed", "table") and not name.endswith(".ape"):  # as info counts them
            k, e = (args.n_activated_experts, args.n_routed_experts) if u.kind == "experts" else (1, 1)
            u.flops += 2 * p.numel() * k // e
    for name, b in model.named_buffers():
        unit(unit_path(name)).weights += b.numel() * b.element_size()
    if args.tie_embeddings:
        unit("head").flops += 2 * args.vocab_size * args.dim
    cache = KVCache(args, batch, context, device="meta", dtype=CACHE_DTYPES[formats.cache])
    for i, layer in enumerate(cache.layers):
        unit(layer_path(args, i)).cache += sum(t.numel() * t.element_size() for t in layer.tensors())
    if cache.engram_ids is not None:
        unit("").cache += cache.engram_ids.numel() * 8
    return units


# --- placement ---
def groups(units: dict[str, Unit], args: ModelArgs) -> list[list[Unit]]:
    """Units in dataflow order, each layer together with its experts and Engram table."""
    def layer(i):
        p = layer_path(args, i)
        return [units[q] for q in (p, f"{p}.ffn.experts", f"{p}.engram.table") if q in units]
    main, mtp = range(args.n_layers), range(args.n_layers, args.n_layers + args.n_mtp_layers)
    return [[units[""], units["embed"]], *map(layer, main), [units["head"]], *map(layer, mtp)]


def split(sizes: list[int], caps: list[int]) -> list[int | None]:
    """Contiguous ranges over devices: item k on device out[k], None past the last one (the tail that does not fit).
    Balanced (each device's share of what is left in proportion to its room), else greedy if that fits more."""
    best: list[int | None] = [None] * len(sizes)
    for balanced in (True, False):
        out, i, used = [], 0, 0
        for k, s in enumerate(sizes):
            while i < len(caps):
                rest, room = sum(sizes[k:]) + used, sum(caps[i:])
                target = caps[i] * min(1.0, rest / room) if balanced and room > 0 else caps[i]
                if used + s <= target or (used + s <= caps[i] and used + s - target < target - used):
                    break
                i, used = i + 1, 0
            if i == len(caps):
                out += [None] * (len(sizes) - k)
                break
            out.append(i)
            used += s
        if out.count(None) < best.count(None):
            best = out
        if None not in best:
            break
    return best


def assign(units: dict[str, Unit], args: ModelArgs, caps: list[int]) -> str:
    """Set every unit's device (steps 1-3 of the module docstring) -> which policy applied."""
    order = groups(units, args)
    where, offload = split([sum(u.size for u in g) for g in order], caps), not caps
    if offload or None in where:
        where, offload = split([sum(u.size for u in g if u.kind not in OFFLOADED) for g in order], caps), True
    for g, d in zip(order, where):
        for u in g:
            u.device = "cpu" if d is None or (offload and u.kind in OFFLOADED) else f"accel:{d}"
    if args.tie_embeddings:  # one tensor: the head computes where the embedding lives
        units["head"].device = units["embed"].device
    room = {f"accel:{i}": cap - sum(u.size for u in units.values() if u.device == f"accel:{i}")
            for i, cap in enumerate(caps)}
    for layer, *rest in order[1:]:  # step 3: spare room takes whole layers' experts back, next to their layer
        for u in rest:
            if u.kind == "experts" and u.device == "cpu" and u.size <= room.get(layer.device, -1):
                u.device, room[layer.device] = layer.device, room[layer.device] - u.size
    return "routed experts in host RAM, computing on the CPU" if offload else "everything on the accelerators"


def ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    runs = [[i for _, i in run] for _, run in itertools.groupby(enumerate(sorted(ids)), lambda t: t[1] - t[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def device_map(units: dict[str, Unit], args: ModelArgs) -> DeviceMap:
    """The placement as a map placement.py applies: runs of layers per device, and experts where they differ."""
    root = units[""].device
    entries = {"": root}
    for name, u in (("embed", units["embed"]), *((k, units["head"]) for k in ("head", "norm", "hc_head"))):
        if u.device != root:
            entries[name] = u.device
    for prefix, ids in (("layers", range(args.n_layers)), ("mtp", range(args.n_mtp_layers))):
        for suffix in ("", ".ffn.experts", ".engram.table"):
            by_device: dict[str, list[int]] = {}
            for i in ids:
                u, parent = units.get(f"{prefix}.{i}{suffix}"), units[f"{prefix}.{i}"]
                if u is not None and u.device != (parent.device if suffix else root):
                    by_device.setdefault(u.device, []).append(i)
            for dev, idx in by_device.items():
                for r in ranges(idx).split(","):
                    entries[f"{prefix}.{r}{suffix}"] = dev
    return DeviceMap(entries)


# --- roofline ---
def cache_read(args: ModelArgs, i: int, position: int) -> int:
    """Cache elements one token's attention reads in layer i at `position` (window, entries, indexer keys)."""
    kind, m, d = args.layer_kind(i), args.compress_ratios[i], args.head_dim
    n = min(args.window_size, position) * d
    if kind == "hca":
        n += position // m * d
    elif kind == "csa":
        n += min(args.index_topk, position // m) * d + position // m * args.index_head_dim
    return n


def load(u: Unit, args: ModelArgs, n: int, seqs: int, position: int, elt: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of unit u for n tokens of `seqs` sequences at `position` (elt: cache bytes/element)."""
    if u.kind == "experts":
        E, K = args.n_routed_experts, args.n_activated_experts
        return u.weights * (1 - (1 - K / E) ** n), n * u.flops  # the share of experts the n tokens touch
    if u.kind == "embed":
        return n * args.dim * u.weights / u.params, 0.0
    if u.kind == "table":
        return n * args.engram_dim * (args.engram_max_ngram - 1) * u.weights / u.params, 0.0
    if u.kind == "layer":
        attn = sum(attention_flops(args, range(u.layer, u.layer + 1), position).values())
        return u.weights + seqs * cache_read(args, u.layer, position) * elt, n * (u.flops + attn)
    return (u.weights, n * u.flops) if u.kind == "head" else (0.0, 0.0)


def crossings(units: dict[str, Unit], args: ModelArgs, n: int, seqs: int, head: bool) -> tuple[int, int]:
    """(bytes, transfers) over PCIe for n tokens of `seqs` sequences (see the module docstring)."""
    root, D, K = units[""].device, args.dim, args.n_activated_experts
    size, transfers, at, seen = 0, 0, root, {root}
    if units["embed"].device != root:
        size, transfers = n * (8 + 2 * D), 2
    for i in range(args.n_layers):
        p = f"layers.{i}"
        layer, experts, table = units[p], units.get(f"{p}.ffn.experts"), units.get(f"{p}.engram.table")
        if layer.device != at:  # the streams move where the device changes
            size, transfers, at = size + n * args.hc_mult * D * 4, transfers + 1, layer.device
        if layer.device != root:  # the token ids, and the step's indices once per device
            new = layer.device not in seen
            size, transfers = size + 8 * n + 24 * seqs * new, transfers + 1 + 3 * new
            seen.add(layer.device)
        if experts is not None and experts.device != layer.device:  # x, weights, indices in; y out
            size, transfers = size + n * (4 * D + 12 * K), transfers + 4
        if table is not None and table.device != layer.device:  # row indices in, rows out
            size, transfers = size + n * (args.engram_max_ngram - 1) * (8 * args.engram_heads + 4 * args.engram_dim), \
                transfers + 2
    if at != root:  # the last layer's streams come home
        size, transfers = size + n * args.hc_mult * D * 4, transfers + 1
    if head and units["head"].device != root:  # hc_head, norm and head each in and out
        size, transfers = size + n * (args.hc_mult * D * 4 + 14 * D + 2 * args.vocab_size), transfers + 6
    return size, transfers


def phase(units: dict[str, Unit], args: ModelArgs, hw: Hardware, n: int, seqs: int, position: int, elt: int,
          head: bool) -> dict:
    """One decode step (n = B tokens) or one prefill chunk (n = C): per device bytes, FLOPs, seconds; PCIe."""
    devices: dict[str, dict] = {}
    for u in units.values():
        if (u.layer is not None and u.layer >= args.n_layers) or (u.kind == "head" and not head):
            continue  # MTP; the head after a prefill chunk
        b, f = load(u, args, n, seqs, position, elt)
        d = devices.setdefault(u.device, {"bytes": 0.0, "flops": 0.0})
        d["bytes"], d["flops"] = d["bytes"] + b, d["flops"] + f
    for name, d in devices.items():
        bandwidth, peak = hw.rates(name)
        d["seconds"] = max(d["bytes"] / bandwidth, d["flops"] / peak)
        d["bound"] = "memory" if d["bytes"] / bandwidth >= d["flops"] / peak else "compute"
    size, transfers = crossings(units, args, n, seqs, head)
    pcie = {"bytes": size, "transfers": transfers,
            "seconds": size / hw.pcie_bandwidth + transfers * hw.pcie_latency}
    return {"devices": dict(sorted(devices.items())), "pcie": pcie,
            "seconds": sum(d["seconds"] for d in devices.values()) + pcie["seconds"]}


def roofline(units: dict[str, Unit], args: ModelArgs, hw: Hardware, context: int, batch: int, chunk: int,
             cache: str) -> dict:
    elt = torch.empty((), dtype=CACHE_DTYPES[cache]).element_size()
    decode = phase(units, args, hw, batch, batch, context, elt, head=True)
    decode["tokens_per_s"] = batch / decode["seconds"]
    c = min(chunk, context)
    prefill = phase(units, args, hw, c, 1, context // 2, elt, head=False)
    prefill["tokens_per_s"] = context / (math.ceil(context / c) * prefill["seconds"])
    return {"decode": {"batch": batch, "context": context, **decode}, "prefill": {"chunk": c, **prefill}}


# --- the plan ---
class DoesNotFit(ValueError):
    """No placement fits: the message names what does not fit and by how much."""


@dataclass
class Plan:
    name: str
    args: ModelArgs
    hardware: Hardware
    formats: Formats
    context: int
    batch: int
    chunk: int
    policy: str
    units: dict[str, Unit]
    device_map: DeviceMap
    memory: dict[str, dict]  # device -> capacity, headroom, weights, cache, free (bytes)
    roofline: dict

    def to_dict(self) -> dict:
        a = self.args
        keys = ("dim", "n_layers", "n_mtp_layers", "n_routed_experts", "n_activated_experts")
        return {"model": self.name, "config": {k: getattr(a, k) for k in keys},
                "inputs": {"context": self.context, "batch": self.batch, "prefill_chunk": self.chunk,
                           "formats": asdict(self.formats), "hardware": asdict(self.hardware)},
                "policy": self.policy, "device_map": self.device_map.to_dict(), "memory": self.memory,
                "holds": {d: holds(self, d) for d in self.memory}, "roofline": self.roofline}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def plan(args: ModelArgs, hardware: Hardware, context: int | str = "128K", batch: int = 1,
         formats: Formats | None = None, chunk: int = 512, name: str = "") -> Plan:
    """Place `args`'s model on `hardware` for `batch` sequences of `context` tokens and estimate its speed.
    Raises DoesNotFit (a ValueError) when host RAM cannot hold what the accelerators do not."""
    formats, context = formats or Formats(), parse_tokens(context)
    if not 0 < context <= args.max_seq_len:
        raise ValueError(f"context {context} is outside the model's 1 .. {args.max_seq_len} tokens")
    if batch < 1 or chunk < 1:
        raise ValueError(f"batch and chunk must be >= 1, got {batch} and {chunk}")
    units = model_units(args, formats, context, batch)
    headroom = hardware.headroom if hardware.headroom is not None else \
        prefill_working_set(args, context, torch.bfloat16, chunk)["total"] + GB
    caps = [max(m - headroom, 0) for m in hardware.accelerators]
    policy = assign(units, args, caps)
    memory = {}
    for i, capacity in enumerate([*hardware.accelerators, hardware.ram]):
        dev, room = ("cpu", hardware.ram_headroom) if i == len(caps) else (f"accel:{i}", headroom)
        here = [u for u in units.values() if u.device == dev]
        weights, cache = sum(u.weights for u in here), sum(u.cache for u in here)
        memory[dev] = {"capacity": capacity, "headroom": room, "weights": weights, "cache": cache,
                       "free": capacity - room - weights - cache}
    if memory["cpu"]["free"] < 0 and memory["cpu"]["weights"] + memory["cpu"]["cache"] > 0:
        cpu = [u for u in units.values() if u.device == "cpu"]
        parts = {"routed experts": sum(u.weights for u in cpu if u.kind == "experts"),
                 "Engram tables": sum(u.weights for u in cpu if u.kind == "table"),
                 "the rest of the model": sum(u.weights for u in cpu if u.kind not in OFFLOADED),
                 "KV cache": sum(u.cache for u in cpu)}
        m = memory["cpu"]
        raise DoesNotFit(
            f"{name or 'the model'} does not fit: host RAM must hold {gb(m['weights'] + m['cache'])} ("
            + ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v) + f") + {gb(m['headroom'])} headroom, but "
            f"has {gb(m['capacity'])}: {gb(-m['free'])} short, with {gb(sum(caps))} of accelerator memory "
            f"({formats.experts} experts, {formats.weights} weights, context {tokens(context)}, batch {batch})")
    return Plan(name, args, hardware, formats, context, batch, chunk, policy, units, device_map(units, args), memory,
                roofline(units, args, hardware, context, batch, chunk, formats.cache))


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def holds(p: Plan, device: str) -> str:
    """What a device holds, in words: 'embed, layers 0-20, experts 0-3, head'."""
    here = [u for u in p.units.values() if u.device == device and u.kind != "root"]
    n = p.args.n_layers
    parts = [u.path for u in here if u.kind in ("embed", "head")]
    for kind, label in (("layer", "layers"), ("experts", "experts of layers"), ("table", "Engram tables of layers")):
        main = [u.layer for u in here if u.kind == kind and u.layer < n]
        mtp = [u.layer - n for u in here if u.kind == kind and u.layer >= n]
        parts += [f"{label} {ranges(main)}"] * bool(main) + [f"MTP {label.split()[0]} {ranges(mtp)}"] * bool(mtp)
    return ", ".join(parts) or "-"


def format_plan(p: Plan) -> str:
    """The plan as the table `dsv4 plan` prints."""
    a, f, hw, r = p.args, p.formats, p.hardware, p.roofline
    total = sum(u.params for u in p.units.values() if u.layer is None or u.layer < a.n_layers)
    lines = [f"{p.name}: {human(total)} parameters (main), {a.n_layers} layers, {a.n_activated_experts} of "
             f"{a.n_routed_experts} experts, {a.n_mtp_layers} MTP; context {tokens(p.context)}, batch {p.batch}",
             f"formats: routed experts {f.experts}, other linear weights {f.weights}, embedding/head {f.embed}, "
             f"KV cache {f.cache} (1 GB = 10^9 bytes)", f"placement: {p.policy}", "",
             f"{'device':<9}{'memory':>10}{'headroom':>10}{'weights':>10}{'KV cache':>10}{'free':>10}  holds"]
    for dev, m in p.memory.items():
        lines.append(f"{dev:<9}" + "".join(f"{gb(m[k]):>10}" for k in ("capacity", "headroom", "weights", "cache",
                                                                         "free")) + f"  {holds(p, dev)}")
    lines += ["", "device map (--device-map, accel:N = this machine's N-th accelerator):",
              json.dumps(p.device_map.to_dict()), "",
              f"roofline inputs: accelerator {hw.gpu_bandwidth / GB:.0f} GB/s, {hw.gpu_flops / 1e12:.0f} TFLOP/s; "
              f"CPU {hw.cpu_bandwidth / GB:.0f} GB/s, {hw.cpu_flops / 1e12:.1f} TFLOP/s; PCIe "
              f"{hw.pcie_bandwidth / GB:.0f} GB/s, {hw.pcie_latency * 1e6:.0f} us a transfer"]
    for label, ph in ((f"decode at {tokens(p.context)}, batch {p.batch}", r["decode"]),
                      (f"prefill of {tokens(p.context)} in {r['prefill']['chunk']}-token chunks", r["prefill"])):
        devs = "; ".join(f"{d} {v['seconds'] * 1e3:.1f} ms {v['bound']}-bound ({gb(v['bytes'])}, "
                         f"{human(v['flops'], 'FLOP')})" for d, v in ph["devices"].items())
        lines.append(f"{label}: {ph['tokens_per_s']:.1f} tokens/s ({ph['seconds'] * 1e3:.1f} ms a "
                     f"{'step' if 'batch' in ph else 'chunk'}: {devs}; PCIe {ph['pcie']['seconds'] * 1e3:.1f} ms, "
                     f"{ph['pcie']['transfers']} transfers of {ph['pcie']['bytes'] / 1e6:.2f} MB)")
    return "\n".join(lines)
