"""What a DeepSeek-V4 configuration costs: parameters (total and active, per component), forward FLOPs per token
and attention-cache bytes, all computed on the `meta` device (nothing is allocated, so V4-Pro takes a blink).

Parameters. Every parameter is counted once (tied weights too) and put in one component: embedding, attention
(with its compressor and lightning indexer), routed experts, shared experts, router, hyper-connections, norms, head,
and, for MTP modules, their e_proj/h_proj. "Active" = parameters a token touches: K of the E routed experts
(hash-routed and learned layers alike), everything else whole, except the embedding: listed with its total but 0
active, since a lookup is no matmul (a tied head still counts as active). The main model and the MTP modules are
reported apart, with totals with and without MTP.
DeepSeek's published sizes (V4-Flash 284B / 13B active, V4-Pro 1.6T / 49B) match the main model WITHOUT MTP and
with the embedding not active, as V3's 671B / 37B did (V3's card lists its 14B MTP module apart): Flash comes out
284.3B / 13.3B, Pro 1.573T / 48.9B; with MTP Flash would be 290.9B, and counting the embedding active 13.8B.
Engram (when on) is reported apart from the backbone: its tables (total rows x width; active = the rows one token
reads, one per order and head) and its gating (key and value projections, norms, convolution: all active).

FLOPs per token, forward, for a token that sees a context of L tokens (itself included; batch and prefill
amortisation ignored, so this is the decode cost at position L):
    matmul    = 2 * (active params of every weight with >= 2 dims but the embedding and the compressors' additive
                    position biases `ape`; a tied head counted)
    attention = sum over layers of 4 * n_heads * head_dim * keys          (q.k and p.v, one shared K=V head)
                keys = min(window_size, L) + compressed entries: HCA L // m, CSA min(index_topk, L // m), SWA 0
    indexer   = sum over CSA layers of 2 * index_n_heads * index_head_dim * (L // m)   (the lightning scan)
Elementwise work (norms, softmaxes, RoPE, SwiGLU, Sinkhorn, stream mixing) is left out: small next to these terms.

Cache bytes at context L, per layer, in `dtype` (bf16 unless given):
    window      min(window_size, L) * head_dim                 (a ring of the last W shared K=V vectors)
    compressed  (L // m) * head_dim                            (CSA and HCA layers)
    indexer     (L // m) * index_head_dim                      (CSA layers: the indexer's own compressed keys)
    partial     compressor state of the window still open: kv and gate for m tokens at the compressor width
                (2*head_dim with CSA's overlap, plus the previous window's first half: 6*m*head_dim; HCA 2*m*head_dim),
                and the same for the indexer's compressor at index_head_dim
bytes per token = total / L. MTP layers keep their own cache; reported apart.
"engine" is what the inference engine's preallocated `KVCache` really holds for one sequence slot of L tokens (main
and MTP layers; the compressors' open rows in fp32), sized on the meta device, and the bytes that grow per token.

Peak memory of a prefill of L tokens (one sequence, `prefill_memory`) = weights + the engine's cache + a working set
that depends on the prefill chunk, not on L: prefill runs `chunk` tokens a step, the lightning indexer scans the
entries a fixed block at a time (dsv4.model.indexer.Indexer.scan) and attention takes its queries in blocks of at most
`Attention.ATTEND_BUDGET` scores, so the largest temporaries are the residual streams and projections of one chunk,
one attention block, one scan block and one chunk's routed-expert activations. The only L-dependent term is the copy
of one HCA layer's compressed entries (L / m rows). The estimate counts the tensors alive at once in the largest of
these phases (tests/test_longctx.py checks it against the tensors really alive during a prefill); allocator slack and
the Python / torch runtime (~0.3 GB) come on top.
"""

import json
import os
import struct
from dataclasses import dataclass

import torch
from torch import nn

from dsv4.config import ModelArgs
from dsv4.model.attention import Attention
from dsv4.model.cache import bytes_per_token
from dsv4.model.engram import Engram
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.moe import Experts, Gate
from dsv4.model.norm import RMSNorm
from dsv4.model.transformer import Transformer

COMPONENTS = ("embedding", "attention", "routed_experts", "shared_experts", "router", "hyper_connections", "norms",
              "head", "mtp_projections")
ENGRAM_COMPONENTS = ("table", "gating")
CONTEXTS = (131072, 1048576)  # 128K and 1M tokens
_BY_TYPE = ((Engram, "engram"), (Attention, "attention"), (Experts, "routed_experts"), (Gate, "router"),
            ((HyperConnection, HyperHead), "hyper_connections"), (nn.Embedding, "embedding"), (RMSNorm, "norms"))


@dataclass
class Count:
    total: int = 0
    active: int = 0
    flops: int = 0  # forward matmul FLOPs per token

    def __add__(self, other: "Count") -> "Count":
        return Count(self.total + other.total, self.active + other.active, self.flops + other.flops)


def meta_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def component_of(name: str, module: nn.Module, parent: str | None) -> str | None:
    if parent is not None:  # a component owns everything beneath it (an indexer's norm is attention)
        return parent
    for types, component in _BY_TYPE:
        if isinstance(module, types):
            return component
    last = name.rsplit(".", 1)[-1]
    if last == "shared_experts":
        return "shared_experts"
    if name == "head":
        return "head"
    if last in ("e_proj", "h_proj"):
        return "mtp_projections"
    return parent


def count_params(model: Transformer) -> dict[str, dict[str, Count]]:
    """{"main" | "mtp": {component: Count}, "engram": {"table" | "gating": Count}}. A shared parameter is counted
    once, under its first owner, but its FLOPs at every module that uses it, so a tied head still costs its matmul."""
    args = model.args
    parts = {"main": {c: Count() for c in COMPONENTS}, "mtp": {c: Count() for c in COMPONENTS},
             "engram": {c: Count() for c in ENGRAM_COMPONENTS}}
    components: dict[str, str | None] = {}
    credited: dict[int, int] = {}  # id(parameter) -> active elements counted so far
    for name, module in model.named_modules():
        parent = components.get(name.rsplit(".", 1)[0] if "." in name else "")
        component = components[name] = component_of(name, module, parent)
        for pname, p in module.named_parameters(recurse=False):
            if component is None:
                raise ValueError(f"info: parameter {name}.{pname} belongs to no component; teach component_of")
            if component == "engram":  # apart from the backbone; a token reads one row per (order, head)
                table = name.endswith(".table")
                active = args.engram_dim * (args.engram_max_ngram - 1) if table else p.numel()
                parts["engram"]["table" if table else "gating"] += Count(p.numel(), active,
                                                                         0 if table else 2 * p.numel())
                continue
            part = parts["mtp" if name.startswith("mtp.") else "main"]
            active = p.numel()
            if component == "routed_experts":
                active = p.numel() * args.n_activated_experts // args.n_routed_experts
            elif component == "embedding":
                active = 0  # a lookup, not a matmul: listed in totals, 0 active (as DeepSeek counts)
            matmul = p.dim() >= 2 and component != "embedding" and pname != "ape"  # ape is added, not multiplied
            flops = 2 * active if matmul else 0
            stored = id(p) not in credited
            extra = active - credited.get(id(p), 0)  # a tied head adds its activity to the embedding's 0
            credited[id(p)] = max(active, credited.get(id(p), 0))
            part[component] += Count(p.numel() if stored else 0, max(extra, 0), flops)
    return parts


def attention_flops(args: ModelArgs, layer_ids: range, context: int) -> dict[str, int]:
    """Per-token score/value and indexer-scan FLOPs of the given layers at `context` (see the module docstring)."""
    attn = index = 0
    for i in layer_ids:
        kind, m = args.layer_kind(i), args.compress_ratios[i]
        keys = min(args.window_size, context)
        if kind == "hca":
            keys += context // m
        elif kind == "csa":
            keys += min(args.index_topk, context // m)
            index += 2 * args.index_n_heads * args.index_head_dim * (context // m)
        attn += 4 * args.n_heads * args.head_dim * keys
    return {"attention": attn, "indexer": index}


def cache_bytes(args: ModelArgs, layer_ids: range, context: int, dtype: torch.dtype) -> dict[str, int]:
    """Attention-cache bytes of the given layers for one sequence of `context` tokens (see the module docstring)."""
    size = torch.empty(0, dtype=dtype).element_size()
    d, c = args.head_dim, args.index_head_dim
    parts = {"window": 0, "compressed": 0, "indexer": 0, "partial": 0}
    for i in layer_ids:
        kind, m = args.layer_kind(i), args.compress_ratios[i]
        parts["window"] += min(args.window_size, context) * d
        if kind == "hca":
            parts["compressed"] += context // m * d
            parts["partial"] += 2 * m * d
        elif kind == "csa":
            parts["compressed"] += context // m * d
            parts["indexer"] += context // m * c
            parts["partial"] += 6 * m * d + 6 * m * c
    parts = {k: v * size for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["per_token"] = parts["total"] / context
    return parts


def engine_cache_bytes(args: ModelArgs, context: int, dtype: torch.dtype) -> int:
    """Bytes the engine's KVCache allocates per sequence slot of `context` tokens (built on meta: nothing real)."""
    from dsv4.model.cache import KVCache

    if context > args.max_seq_len:  # an accounting beyond the configured context: size it all the same
        args = ModelArgs.from_dict({**args.to_dict(), "max_seq_len": context})
    cache = KVCache(args, slots=1, max_len=context, device="meta", dtype=dtype)
    return cache.nbytes() // (cache.slots + 1)  # one slot (the engine also keeps one spare)


def weight_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of the weights in compute dtype `dtype` (the release's fp32 parameters stay fp32), MTP included."""
    model = meta_model(args).to_dtype(dtype)  # parameters() yields a tied weight once
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def prefill_working_set(args: ModelArgs, context: int, dtype: torch.dtype, chunk: int = 512) -> dict[str, int]:
    """Bytes of the temporaries alive at once while one sequence prefills `chunk` tokens a step at `context`, by
    phase (see the module docstring); the largest phase is the working set."""
    from dsv4.model.indexer import Indexer

    c = chunk
    size = torch.empty((), dtype=dtype).element_size()
    n, D = args.hc_mult, args.dim
    # the residual streams (fp32: input, output, the mixed input, post/comb, the sub-layer's output in both dtypes)
    streams = 4 * (3 * c * n * D + c * n * n + 2 * c * D)
    proj = c * size * (args.q_lora_rank + 4 * args.n_heads * args.head_dim + 8 * args.head_dim
                       + 2 * args.index_n_heads * args.index_head_dim)  # q (and its RoPE'd copies), kv, compressors
    W = args.window_size
    entries = max([context // args.compress_ratios[i] for i in range(args.n_layers) if args.layer_kind(i) == "hca"]
                  or [0])
    widest = max(2 * W + entries, 2 * W + args.index_topk)
    block = max(Attention.ATTEND_BUDGET // (args.n_heads * (widest + 1)), 1)
    block = block // W * W if block >= W else block  # as Attention.attend_blocks
    scores = min(c, block) * args.n_heads * widest
    # logits, their concatenation with the sink, the soft-max (fp32) and its copy in the compute dtype
    attention = scores * (3 * 4 + size) + entries * args.head_dim * size + min(c, block) * args.index_topk * \
        args.head_dim * size
    # a block's dot products SCAN_SUB entries at a time (and their ReLU, in fp32, weighted), its scores (and masked)
    scan = Indexer.SCAN_QUERIES * (args.index_n_heads * Indexer.SCAN_SUB * (2 * size + 8) + Indexer.SCAN_BLOCK * 8) \
        + c * args.index_n_heads * args.index_head_dim * size if any(
            args.layer_kind(i) == "csa" for i in range(args.n_layers)) else 0
    moe = c * args.n_activated_experts * (3 * args.moe_inter_dim + 2 * D) * size + c * args.n_routed_experts * 4 * 2
    head = 2 * args.vocab_size * 4
    phases = {"attention": attention, "indexer_scan": scan, "moe": moe}
    return {"streams": streams, "projections": proj, **phases, "head": head,
            "total": streams + proj + max(phases.values()) + head}


def prefill_memory(args: ModelArgs, context: int, dtype: torch.dtype = torch.bfloat16,
                   cache_dtype: torch.dtype | None = None, chunk: int = 512) -> dict[str, int]:
    """Peak bytes to prefill one sequence of `context` tokens: weights + the engine's cache + the working set."""
    weights = weight_bytes(args, dtype)
    cache = engine_cache_bytes(args, context, cache_dtype or dtype)
    work = prefill_working_set(args, context, dtype, chunk)["total"]
    return {"weights": weights, "cache": cache, "working_set": work, "total": weights + cache + work}


def model_info(args: ModelArgs, contexts=CONTEXTS, cache_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Everything `dsv4 info` reports, as plain JSON-able data."""
    parts = count_params(meta_model(args))
    totals = {part: sum(comps.values(), Count()) for part, comps in parts.items()}
    with_mtp = totals["main"] + totals["mtp"]
    main_layers = range(args.n_layers)
    mtp_layers = range(args.n_layers, args.n_layers + args.n_mtp_layers)
    flops, cache, memory = {}, {}, {}
    for L in contexts:
        main, mtp = attention_flops(args, main_layers, L), attention_flops(args, mtp_layers, L)
        main_total = totals["main"].flops + totals["engram"].flops + main["attention"] + main["indexer"]
        mtp_total = totals["mtp"].flops + mtp["attention"] + mtp["indexer"]
        flops[str(L)] = {"matmul": totals["main"].flops, **main, "engram": totals["engram"].flops,
                         "total": main_total,
                         "mtp": mtp_total, "total_with_mtp": main_total + mtp_total}
        cache[str(L)] = {**cache_bytes(args, main_layers, L, cache_dtype),
                         "mtp": cache_bytes(args, mtp_layers, L, cache_dtype)["total"],
                         "engine": engine_cache_bytes(args, L, cache_dtype)}
        memory[str(L)] = prefill_memory(args, L, cache_dtype)
    kinds = [args.layer_kind(i) for i in main_layers]
    return {
        "config": {"dim": args.dim, "n_layers": args.n_layers, "layers": {k: kinds.count(k) for k in
                                                                           ("swa", "csa", "hca")},
                   "n_routed_experts": args.n_routed_experts, "n_activated_experts": args.n_activated_experts,
                   "n_mtp_layers": args.n_mtp_layers, "vocab_size": args.vocab_size},
        "params": {part: {c: {"total": v.total, "active": v.active} for c, v in comps.items() if v.total or v.active}
                   for part, comps in parts.items() if part != "engram" or args.engram},
        "totals": {"main": {"total": totals["main"].total, "active": totals["main"].active},
                   "mtp": {"total": totals["mtp"].total, "active": totals["mtp"].active},
                   "with_mtp": {"total": with_mtp.total, "active": with_mtp.active},
                   **({"engram": {"total": totals["engram"].total, "active": totals["engram"].active}}
                      if args.engram else {})},
        "published_sizes_exclude_mtp": True,
        "flops_per_token": flops,
        "cache_dtype": str(cache_dtype).removeprefix("torch."),
        "cache_bytes": cache,
        "engine_cache_bytes_per_token": bytes_per_token(args, cache_dtype),
        "prefill_memory": memory,
    }


# --- checkpoints: stored tensors, read from the safetensors headers alone ---
def checkpoint_tensors(path: str | os.PathLike) -> dict:
    """Tensor count, element count and bytes of every *.safetensors file in `path`, by stored dtype."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    out = {"files": len(files), "tensors": 0, "elements": 0, "bytes": 0, "dtypes": {}}
    for name in files:
        with open(os.path.join(path, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, t in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for s in t["shape"]:
                numel *= s
            nbytes = t["data_offsets"][1] - t["data_offsets"][0]
            out["tensors"] += 1
            out["elements"] += numel
            out["bytes"] += nbytes
            out["dtypes"][t["dtype"]] = out["dtypes"].get(t["dtype"], 0) + nbytes
    return out


# --- the readable table ---
def human(n: float, unit: str = "") -> str:
    """1.23B parameters; with a unit, SI prefixes: 1.23 GFLOP."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}" if unit else f"{n / scale:.2f}{suffix}"
    return f"{n:.0f} {unit}" if unit else f"{n:.0f}"


def tokens(n: int) -> str:
    """131072 -> 128K, 1048576 -> 1M"""
    for shift, suffix in ((20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    for scale, suffix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def format_table(info: dict, title: str = "") -> str:
    cfg, p, t = info["config"], info["params"], info["totals"]
    lines = [f"{title}  dim {cfg['dim']}, {cfg['n_layers']} layers (" +
             ", ".join(f"{v} {k.upper()}" for k, v in cfg["layers"].items() if v) +
             f"), {cfg['n_activated_experts']} of {cfg['n_routed_experts']} experts, {cfg['n_mtp_layers']} MTP",
             "", f"{'parameters':<20}{'total':>12}{'active':>12}{'MTP total':>12}{'MTP active':>12}"]
    for c in COMPONENTS:
        main, mtp = p["main"].get(c), p["mtp"].get(c)
        if main or mtp:
            cells = [human(x[k]) if x else "-" for x in (main, mtp) for k in ("total", "active")]
            lines.append(f"{c.replace('_', ' '):<20}" + "".join(f"{x:>12}" for x in cells))
    lines.append(f"{'sum':<20}{human(t['main']['total']):>12}{human(t['main']['active']):>12}"
                 f"{human(t['mtp']['total']):>12}{human(t['mtp']['active']):>12}")
    lines.append(f"with MTP: {human(t['with_mtp']['total'])} total, {human(t['with_mtp']['active'])} active "
                 f"(published sizes count the main model only)")
    if "engram" in t:
        e = p["engram"]
        lines.append(f"Engram (apart from the above): {human(e['table']['total'])} in tables ("
                     f"{human(e['table']['active'])} read per token), {human(e['gating']['total'])} gating (active)")
    lines += ["", f"{'per token at context':<22}" + "".join(f"{tokens(int(L)):>14}" for L in info["flops_per_token"])]
    rows = [("matmul FLOPs", "matmul"), ("attention FLOPs", "attention"), ("indexer FLOPs", "indexer"),
            *([("Engram FLOPs", "engram")] if "engram" in t else []), ("total FLOPs", "total"),
            ("  + MTP", "mtp")]
    for label, key in rows:
        lines.append(f"{label:<22}" + "".join(f"{human(v[key], 'FLOP'):>14}" for v in info["flops_per_token"].values()))
    lines.append(f"{'cache / token':<22}" + "".join(f"{human_bytes(v['per_token']):>14}"
                                                    for v in info["cache_bytes"].values()))
    lines.append(f"{'cache / sequence':<22}" + "".join(f"{human_bytes(v['total']):>14}"
                                                       for v in info["cache_bytes"].values()))
    lines.append(f"(cache in {info['cache_dtype']}, main layers; MTP adds " +
                 ", ".join(human_bytes(v["mtp"]) for v in info["cache_bytes"].values()) + ")")
    lines.append(f"{'engine cache / seq':<22}" + "".join(f"{human_bytes(v['engine']):>14}"
                                                        for v in info["cache_bytes"].values()))
    lines.append(f"(the inference engine's allocation, MTP included; it grows by "
                 f"{human_bytes(info['engine_cache_bytes_per_token'])} per token)")
    lines.append("")
    for label, key in (("prefill peak memory", "total"), ("  weights", "weights"), ("  engine cache", "cache"),
                       ("  working set", "working_set")):
        lines.append(f"{label:<22}" + "".join(f"{human_bytes(v[key]):>14}" for v in info["prefill_memory"].values()))
    lines.append(f"(one sequence, weights and cache in {info['cache_dtype']}, 512-token prefill chunks; "
                 f"the Python / torch runtime adds ~0.3 GiB)")
    if "checkpoint" in info:
        ck = info["checkpoint"]
        lines += ["", f"checkpoint {ck['path']}: {ck['files']} files, {ck['tensors']} tensors, "
                      f"{human(ck['elements'])} elements, {human_bytes(ck['bytes'])} "
                      f"({', '.join(f'{k} {human_bytes(v)}' for k, v in ck['dtypes'].items())})"]
        if ck.get("quantization"):
            q = ck["quantization"]
            if q.get("quant_method") == "dsv4":
                group = f", {q['group_size']} inputs per scale" if q.get("format") == "int4" else ""
                lines.append(f"kept quantized in memory: {q['format']}{group} (linear layers and routed experts)")
            else:
                lines.append(f"stored quantized ({q.get('quant_method', '?')}); decoded to the compute dtype on load")
    return "\n".join(lines)


# --- `dsv4 info` ---
def describe(preset: str | None = None, ckpt: str | os.PathLike | None = None, contexts=CONTEXTS,
             cache_dtype: str | torch.dtype = "bf16", as_json: bool = False) -> str:
    """The report on a named preset or a checkpoint directory's config.json (plus its stored tensors), as the table
    `dsv4 info` prints or as JSON."""
    from dsv4.device import resolve_dtype
    from dsv4.weights.checkpoint import read_config

    if (preset is None) == (ckpt is None):
        raise ValueError("give a preset or a checkpoint directory")
    args, raw = (ModelArgs.from_name(preset), {}) if preset else read_config(ckpt)
    title = preset or ckpt
    report = {"name": title, **model_info(args, contexts=contexts, cache_dtype=resolve_dtype(cache_dtype))}
    if ckpt:
        report["checkpoint"] = {"path": ckpt, **checkpoint_tensors(ckpt),
                                "quantization": raw.get("quantization_config")}
    return json.dumps(report, indent=2) if as_json else format_table(report, title)
