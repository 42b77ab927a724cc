"""Checkpoint IO: sharded safetensors in three name layouts, loaded lazily with FP8/FP4 dequantised on the fly.

Layouts (the same tensors under different names; shapes equal unless noted):
    dsv4      our module names: `layers.{i}.attn.wq_a.weight`, `layers.{i}.hc_attn.fn`, `layers.{i}.ffn.experts.w13`
    hf        transformers' DeepseekV4ForCausalLM: `model.layers.{i}.self_attn.q_a_proj.weight`, `...attn_hc.fn`,
              `...mlp.experts.gate_up_proj` [E, 2I, D] (w1 rows, then w3 rows); `mtp.{j}.` + the same inner names
              (transformers ignores `mtp.*`; we keep the MTP modules there).
    upstream  DeepSeek's release: our names except `hc_attn_fn` (also hc_ffn_*, hc_head_*), one tensor per routed
              expert `ffn.experts.{e}.w{1,2,3}.weight` ([I, D], [D, I], [I, D]) and quantized weights: FP8 or packed FP4
              with a `<name>.scale` next to `<name>.weight` (see dsv4.kernels.quant).
transformers' own `save_pretrained` may write a hybrid (`model.` + upstream names, `model.embed_tokens`,
`model.hc_head.hc_fn`) and spells every `kv_norm` as `norm`; the loader reads all of these, and any mix of them.
HF FP8 checkpoints name scales `*_scale_inv`.

    files:   model-0000k-of-0000N.safetensors + model.safetensors.index.json + config.json
    load:    build on `meta` -> to_empty(device) (or a device map's devices: dsv4.weights.placement.materialize)
             -> RoPE tables -> copy each tensor in (dequantised, cast to the destination's dtype) one at a time from
             mmapped `safe_open` handles: memory ~ the model + one tensor.
Which tensors are quantized is read from the files (dtype, presence of a scale), never from a list of names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings

import torch
from safetensors import safe_open

from dsv4.config import ModelArgs
from dsv4.kernels import quant
from dsv4.model.quantized import quantize_as_configured, saved_quantization
from dsv4.weights.names import LAYOUTS, Target, detect_layout, resolve, scale_owner, to_layout_name
from dsv4.weights.packed import as_stored, is_codes, keep_stored_formats, scale_target
from dsv4.weights.placement import DeviceMap, materialize
from dsv4.weights.shards import ShardWriter
from dsv4.weights.tensors import _FP4_ST, _FP8_ST, _INT_ST, INDEX_FILE, _Entry, _listing, _mmap_entry, _scan, mappable

CONFIG_FILE = "config.json"

# --- config ----------------------------------------------------------------------------------------------------------
# keys of DeepSeek's inference config.json that choose kernels or runtime sizes, not the math
_UPSTREAM_RUNTIME_KEYS = ("max_batch_size", "dtype", "scale_fmt", "expert_dtype", "scale_dtype")


def read_config(path: str | os.PathLike) -> tuple[ModelArgs, dict]:
    """config.json of a checkpoint directory -> (ModelArgs, raw dict). Accepts transformers' config (detected by
    model_type / hidden_size) and DeepSeek's inference config (our field names)."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{os.fspath(path)}: no {CONFIG_FILE}; a checkpoint directory needs one next to its "
                                f"*.safetensors files")
    raw = _read_json(cfg_path)
    try:
        if "model_type" in raw or "hidden_size" in raw:
            return ModelArgs.from_hf_config(raw), raw
        return ModelArgs.from_dict({k: v for k, v in raw.items() if k not in _UPSTREAM_RUNTIME_KEYS}), raw
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fp8_block(raw: dict) -> tuple[int, int]:
    block = (raw.get("quantization_config") or {}).get("weight_block_size") or quant.FP8_BLOCK
    return int(block[0]), int(block[1])


# --- loading ---------------------------------------------------------------------------------------------------------


def _dest(model_tensors: dict[str, torch.Tensor], t: Target) -> torch.Tensor:
    """The model tensor (or expert slice) a target fills."""
    dest = model_tensors[t.param]
    if t.expert is None:
        return dest
    if t.part == "w2":
        return dest[t.expert]
    inter = dest.shape[1] // 2
    return dest[t.expert, :inter] if t.part == "w1" else dest[t.expert, inter:]


def _expert_name(param: str, e: int, part: str) -> str:
    return f"{param.rsplit('.', 1)[0]}.{e}.{part}.weight"


def _check(name: str, e: _Entry, dest: torch.Tensor, scale: str | None, s: _Entry | None,
           fp8_block: tuple[int, int]) -> tuple[str, str] | None:
    """One stored tensor (and its scale) against its destination: (problem kind, message) or None."""
    if dest.dtype in quant.FP8_DTYPES:  # a model that keeps FP8 codes (dsv4.kernels.qweight) takes them as stored
        if e.dtype not in _FP8_ST or e.shape != tuple(dest.shape):
            return "bad format", f"{name} ({e.dtype} {list(e.shape)}) cannot fill FP8 codes {list(dest.shape)}"
        return None
    if is_codes(dest) and scale is not None:  # packed FP4 kept packed: codes and scales as stored
        if e.shape != tuple(dest.shape):
            return "wrong shape", f"{name}: checkpoint {list(e.shape)} (packed), model codes {list(dest.shape)}"
        return None
    quantized = e.dtype in _FP8_ST or (scale is not None and e.dtype in _FP4_ST)
    if quantized and scale is None:
        return "bad format", f"{name} is stored as {e.dtype} but has no scale tensor"
    if scale is not None and not quantized:
        return "bad format", f"{name} has a scale {scale} but is stored as {e.dtype}, not FP8 or packed FP4"
    shape = (*e.shape[:-1], 2 * e.shape[-1]) if quantized and e.dtype in _FP4_ST else e.shape  # two codes a byte
    if shape != tuple(dest.shape):
        unpacked = " (after unpacking FP4)" if shape != e.shape else ""
        return "wrong shape", f"{name}: checkpoint {list(shape)}, model {list(dest.shape)}{unpacked}"
    if scale is not None:
        want = quant.fp8_scale_shape(e.shape, fp8_block) if e.dtype in _FP8_ST else quant.fp4_scale_shape(e.shape)
        if s.shape != want:
            return "wrong shape", f"{scale}: scale of {name} is {list(s.shape)}, expected {list(want)}"
    elif (e.dtype in _INT_ST) == dest.is_floating_point():
        return "bad format", f"{name} is stored as {e.dtype} but the model keeps it as {dest.dtype}"
    return None


def _plan(entries: dict[str, _Entry], model_tensors: dict[str, torch.Tensor], groups: list[list[str]],
          fp8_block: tuple[int, int]) -> tuple[list[tuple[str, Target, str | None]], list[str]]:
    """Match checkpoint tensors to model tensors from the headers alone.
    -> ([(checkpoint name, target, scale name or None)], [error lines])."""
    names = set(entries)
    # a quantized model keeps its scales (`X.scale` of a QuantLinear): those are model tensors, not scales to apply
    scales = {n: w for n in names if n not in model_tensors and (w := scale_owner(n, names)) is not None}
    scale_of = {w: s for s, w in scales.items()}
    layout = detect_layout(names)
    plan, unexpected, problems, twice = [], [], {"wrong shape": [], "bad format": []}, []
    filled: dict[str, set] = {}  # model tensor -> {"all"} or {(expert, part), ...} the checkpoint covers
    for name in sorted(names):
        if name in scales:
            if scales[name] not in names:
                unexpected.append(f"{name} (a scale without its weight {scales[name]})")
            continue
        t = resolve(name) or (Target(name) if name in model_tensors else None)
        if t is None or t.param not in model_tensors or (
                t.expert is not None and not 0 <= t.expert < model_tensors[t.param].shape[0]):
            unexpected.append(name)
            continue
        key = "all" if t.expert is None else (t.expert, t.part)
        got = filled.setdefault(t.param, set())
        if key in got or (key != "all" and "all" in got) or (key == "all" and got):
            twice.append(f"{name} (-> {t.param})")
            continue
        got.add(key)  # present, even if unusable below: reported once, as what it is, never also as missing
        scale = scale_of.get(name)
        if scale is not None and is_codes(_dest(model_tensors, t)):  # kept packed: its scales fill the model's
            filled.setdefault(scale_target(t).param, set()).add(key)
        problem = _check(name, entries[name], _dest(model_tensors, t), scale, scale and entries[scale], fp8_block)
        if problem:
            problems[problem[0]].append(problem[1])
        else:
            plan.append((name, t, scale))

    missing = []
    for group in groups:  # a tied tensor is filled by any one of its names
        param = group[0]
        got = set().union(*(filled.get(g, set()) for g in group))
        if "all" in got:
            continue
        if got or (layout == "upstream" and param.endswith((".experts.w13", ".experts.w2"))):
            # experts go one by one: name the absent ones
            parts = ("w2",) if param.endswith(("w2", "w2_scale")) else ("w1", "w3")
            missing += [_expert_name(param, e, p) for e in range(model_tensors[param].shape[0]) for p in parts
                        if (e, p) not in got]
            continue
        try:
            hint = to_layout_name(param, layout)
        except ValueError:  # a tensor the layout has no name for yet
            hint = param
        missing.append(param if hint == param else f"{param} [{layout}: {hint}]")
    errors = []
    for title, items in (("missing", missing), ("unexpected", unexpected), *problems.items(),
                         ("given twice", twice)):
        if items:
            errors.append(f"{len(items)} {title}: {_listing(items)}")
    return plan, errors


@dataclasses.dataclass
class Reading:
    """What a checkpoint directory holds for a model, matched and checked from the headers (`plan_reading`)."""
    path: str
    entries: dict[str, _Entry]
    plan: list[tuple[str, Target, str | None]]  # (checkpoint name, target, scale name or None), shard by shard
    fp8_block: tuple[int, int]


def plan_reading(model: torch.nn.Module, path: str | os.PathLike, fp8_block: tuple[int, int] | None = None) -> Reading:
    """Match the checkpoint at `path` (any layout) to `model`'s parameters and persistent buffers. Every problem
    (missing, unexpected, wrong shape, bad format) is found from the headers and raised together in one ValueError
    before any data is read."""
    path = os.fspath(path)
    if fp8_block is None:
        cfg_path = os.path.join(path, CONFIG_FILE)
        fp8_block = _fp8_block(_read_json(cfg_path) if os.path.isfile(cfg_path) else {})
    entries = _scan(path)
    model_tensors = dict(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}  # tied tensors (embed / head) appear under several names
    for name, t in model_tensors.items():
        groups.setdefault(id(t), []).append(name)
    plan, errors = _plan(entries, model_tensors, list(groups.values()), fp8_block)
    if errors:
        raise ValueError(f"checkpoint {path} (layout {detect_layout(entries)}) does not fit the model:\n  "
                         + "\n  ".join(errors))
    plan.sort(key=lambda p: (entries[p[0]].file, p[0]))  # shard by shard, so each file's pages are touched once
    return Reading(path, entries, plan, fp8_block)


@torch.no_grad()
def load_into(model: torch.nn.Module, path: str | os.PathLike, fp8_block: tuple[int, int] | None = None,
              mmap: frozenset[str] = frozenset()) -> None:
    """Fill `model`'s parameters and persistent buffers from the checkpoint at `path` (any layout), in place, after
    checking all of it (plan_reading). Parameters named in `mmap` (on the CPU, stored whole in their own dtype) are
    memory-mapped from their file instead of read (Engram's tables, routed experts: pages come in when touched)."""
    read_into(model, plan_reading(model, path, fp8_block), mmap)


@torch.no_grad()
def read_into(model: torch.nn.Module, reading: Reading, mmap: frozenset[str] = frozenset(), only=None) -> None:
    """Copy a checked reading into `model`; `only`: a predicate on model tensor names, to fill a part of the model
    (dsv4 quantize reads one layer at a time into a model whose other layers stay on `meta`)."""
    path, entries = reading.path, reading.entries
    model_tensors = dict(model.state_dict(keep_vars=True))
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def handle(fname: str):
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(os.path.join(path, fname), framework="pt"))
            return handles[fname]

        for name, target, scale in reading.plan:
            if only is not None and not only(target.param):
                continue
            dest = _dest(model_tensors, target)
            if target.param in mmap and target.expert is None and scale is None and dest.device.type == "cpu" \
                    and mappable(entries[name], dest.dtype):
                dest.data = _mmap_entry(path, entries[name], name)
                continue
            tensor = handle(entries[name].file).get_tensor(name)
            if scale is not None and is_codes(dest):  # kept packed (dsv4.weights.packed): codes and scales as stored
                s = handle(entries[scale].file).get_tensor(scale)
                scales = _dest(model_tensors, scale_target(target))
                scales.copy_(as_stored(s, scales))
            elif scale is not None:  # dequantise where the weight will live (fast on an accelerator)
                s = handle(entries[scale].file).get_tensor(scale)
                tensor = quant.dequantize(tensor.to(dest.device), s.to(dest.device), reading.fp8_block)
            dest.copy_(as_stored(tensor, dest))  # casts to the dtype the model keeps this tensor in


def checkpoint_args(path: str) -> tuple[ModelArgs, dict]:
    """read_config, for loading: a checkpoint without any `mtp.*` tensor (as transformers writes) gets a model
    without MTP modules, with a warning."""
    args, raw = read_config(path)
    if args.n_mtp_layers and not any(n.removeprefix("model.").startswith("mtp.") for n in _scan(path)):
        warnings.warn(f"{path} holds no MTP weights (transformers does not save them); loading without the "
                      f"{args.n_mtp_layers} MTP module(s)", stacklevel=3)
        args = ModelArgs.from_dict({**args.to_dict(), "n_mtp_layers": 0,
                                    "compress_ratios": args.compress_ratios[: args.n_layers]})
    return args, raw


def _to_empty(model: torch.nn.Module, device) -> None:
    """`Module.to_empty` gives every parameter its own storage, which unties a tied head and embedding; tie again."""
    first, ties = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        first.setdefault(id(p), name)
    model.to_empty(device=device)
    for name, source in ties:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(source))


def _init_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE tables) are not in checkpoints and are garbage after `to_empty`."""
    for method in ("init_rope", "init_buffers"):
        if hasattr(model, method):
            getattr(model, method)()
            return
    model.init_weights()  # fallback: everything fresh, then the checkpoint overwrites what it holds


def from_pretrained(path: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, args: ModelArgs | None = None, engram_mmap: bool = False,
                    device_map=None, keep_packed: bool = False, experts_mmap: bool = False):
    """Build a Transformer from a checkpoint directory. `dtype` casts the compute weights (the model keeps its fp32
    tensors: hyper-connections, norms, sinks, ...); None keeps the model's defaults. `args` overrides config.json.
    engram_mmap: Engram's tables stay in their files, memory-mapped, and on the CPU whatever `device` (for inference:
    the block gathers its rows there and moves only those).
    device_map (instead of `device`; a DeviceMap or what DeviceMap.parse reads): each tensor gets empty storage on its
    device and the checkpoint is copied straight into it, shard by shard (dsv4.weights.placement.materialize); the
    model's `placement` holds the map and its hooks (None when unplaced). With engram_mmap, the tables the map puts
    on the CPU are the ones mapped.
    keep_packed: the release's FP8 / FP4 weights stay packed in memory (dsv4.weights.packed) instead of decoded.
    experts_mmap: routed experts placed on the CPU and stored whole in the dtype the model keeps (the dsv4 and hf
    layouts; a `dsv4 quantize`d checkpoint's codes) stay in their files, memory-mapped: loading costs no time and the
    page cache holds them (the release's one tensor per expert is read as usual).
    A checkpoint without any `mtp.*` tensor (as transformers writes) loads without MTP modules, with a warning (and
    a device map's `mtp.*` entries are dropped)."""
    from dsv4.model.transformer import Transformer

    if device is not None and device_map is not None:
        raise ValueError("give a device or a device map, not both")

    path = os.fspath(path)
    raw = {}
    if args is None:
        args, raw = checkpoint_args(path)
        if device_map is not None and not args.n_mtp_layers:  # no MTP modules: a map's `mtp.*` entries go
            device_map = DeviceMap({k: v for k, v in DeviceMap.parse(device_map).entries.items()
                                    if k.partition(".")[0] != "mtp"})
    else:
        cfg_path = os.path.join(path, CONFIG_FILE)
        raw = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        model.to_dtype(dtype)
    quantize_as_configured(model, raw)  # `dsv4 quantize` wrote it: the layers stay quantized in memory
    if keep_packed:
        keep_stored_formats(model, _scan(path))
    tables = frozenset(n for n, _ in model.named_parameters() if n.endswith("engram.table.weight")) \
        if engram_mmap else frozenset()
    experts = frozenset(n for n, _ in model.state_dict(keep_vars=True).items()
                        if ".experts.w" in n) if experts_mmap else frozenset()
    if device_map is None:
        model.placement = None
        _to_empty(model, device or "cpu")
        for name in tables:  # on the CPU whatever the device (untouched storage costs no memory): mapped in load_into
            p = model.get_parameter(name)
            p.data = torch.empty(p.shape, dtype=p.dtype, device="cpu")
    else:  # the map decides where a table lives; those it puts on the CPU are mapped
        model.placement = materialize(model, device_map)
        tables = frozenset(n for n in tables if model.get_parameter(n).device.type == "cpu")
    _init_buffers(model)
    load_into(model, path, _fp8_block(raw), mmap=tables | experts)  # experts: the map's CPU ones (load_into checks)
    return model


def load_state_dict(path: str | os.PathLike, args: ModelArgs | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint as our state_dict (dequantised, experts fused), on the CPU."""
    return from_pretrained(path, device="cpu", dtype=dtype, args=args).state_dict()


# --- saving ----------------------------------------------------------------------------------------------------------
def export(model: torch.nn.Module, layout: str = "hf", only=None):
    """Yield (name in `layout`, tensor view) for every persistent tensor, each storage once (tied head skipped);
    `only`: a predicate on our tensor names, to export a part of the model (a layer at a time)."""
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or (only is not None and not only(name)):
            continue
        seen.add(id(t))
        t = t.detach()
        if layout == "upstream" and name.endswith((".experts.w13", ".experts.w2")):
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("w2"):
                    yield f"{prefix}.{e}.w2.weight", t[e]
                else:
                    inter = t.shape[1] // 2
                    yield f"{prefix}.{e}.w1.weight", t[e, :inter]
                    yield f"{prefix}.{e}.w3.weight", t[e, inter:]
            continue
        yield to_layout_name(name, layout), t


def checkpoint_config(args: ModelArgs, layout: str, dtype: torch.dtype, quantization: dict | None) -> dict:
    """config.json of a checkpoint in `layout` whose compute weights are stored in `dtype`."""
    config = args.to_dict() if layout == "upstream" else {**args.to_hf_config(),
                                                          "dtype": str(dtype).removeprefix("torch.")}
    if quantization:
        config["quantization_config"] = quantization
    return config


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int = 4 * 2**30,
                    layout: str = "hf") -> list[str]:
    """Write `path`/model-0000k-of-0000N.safetensors + index + config.json; returns the shard file names.
    Everything is written into a temporary directory next to `path` and moved into place with os.replace (the whole
    directory when `path` does not exist yet; else file by file, index last, then stale shards are removed)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    quantization = saved_quantization(model, layout)
    config = checkpoint_config(model.args, layout, model.embed.weight.dtype, quantization)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)  # greedy shards in state_dict order
        for name, t in export(model, layout):
            writer.add(name, t)
        fnames, index = writer.close()
        write_json(os.path.join(tmp, CONFIG_FILE), config)
        write_json(os.path.join(tmp, INDEX_FILE), index)
        if not os.path.exists(path):
            os.replace(tmp, path)
            return fnames
        for fname in (*fnames, CONFIG_FILE, INDEX_FILE):  # the index goes last: it makes the new shards current
            os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
        for stale in os.listdir(path):
            if _SHARD.match(stale) and stale not in fnames:
                os.remove(os.path.join(path, stale))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fnames


def load_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, engram_mmap: bool = True, device_map=None,
                    keep_packed: bool = False, experts_mmap: bool = True):
    """A checkpoint directory that `dsv4 train` wrote (weights + tokenizer.json) -> (model in eval mode, tokenizer).
    For inference, Engram's tables and the routed experts on the CPU stay memory-mapped in their files where they
    can (engram_mmap, experts_mmap), and `device_map` places the model instead of `device`; keep_packed keeps the
    release's FP8/FP4 weights packed (see from_pretrained)."""
    from dsv4.tokenizers.text import Tokenizer

    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    model = from_pretrained(path, device=device, dtype=dtype, engram_mmap=engram_mmap, experts_mmap=experts_mmap,
                            device_map=device_map, keep_packed=keep_packed).eval()
    return model, Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
