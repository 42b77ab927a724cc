"""Placement (issue 23): which device each part of a model lives and computes on, and only activations crossing.

A device map names placeable modules by path and gives each a device, e.g. V4-Flash on two cards and host memory:
    {"": "accel:0", "layers.21-42": "accel:1", "layers.*.ffn.experts": "cpu",
     "head": "accel:1", "norm": "accel:1", "hc_head": "accel:1"}
Keys are dotted module paths; a numeric component may be an index (7), an inclusive range (0-20) or "*"; "" is the
default for everything unnamed and must be there. A key covers the module it names and everything beneath it; the
most specific key wins (more components, then an index over a range over "*"); two keys equally specific for one
module are an error. Values are device strings ("cpu", "meta", or an accelerator's "<kind>:<index>", a kind of
dsv4.device.KINDS) or "accel:N", the N-th device of whatever accelerator this machine has (what `dsv4 plan` writes,
so a plan made on one machine reads on another). The map is plain JSON.

Placeable modules: the ones the model calls as modules, so a hook sees what enters and leaves them:
    embed, layers.N, layers.N.ffn, layers.N.ffn.experts, layers.N.ffn.shared_experts, layers.N.engram,
    layers.N.engram.table, hc_head, norm, head, mtp.J (and its ffn, ffn.experts, ffn.shared_experts, hc_head, norm)
A layer's attention, norms, hyper-connections, router and KV cache go with `layers.N` (attention is also entered
through `Attention.step`, which no hook sees). An Engram table may sit anywhere: the Engram module gathers its rows
where the table lives and moves only those (dsv4.model.engram).

Crossing. Every placeable module whose key differs from its caller's is a boundary (on the same device too: it costs
nothing and shows in `Placement.calls`). There a forward pre-hook moves the tensor inputs to the module's device,
through tuples, lists, dicts and dataclasses (a `Step` is rebuilt there, once per device; a cache is never copied, it
must already be there: build the KVCache with `devices=cache_devices(model)`), and a forward hook moves the outputs
back to where the first input came from. Routed experts on the CPU so receive x [N, D], the routing weights and
indices [N, K] and hand back [N, D]: their weights never move. A layer's output stays on its device (the next layer
takes it from there, and the model brings the last layer's home), so the streams cross only where the device
changes, not twice per layer.

Memory. `materialize` gives each parameter and buffer of a model built on `meta` empty storage on its device, tensor
by tensor; a loader then copies the checkpoint in one tensor at a time (dsv4.weights.checkpoint.load_into reads shard
by shard), so the whole model is never in host memory at once. `place` moves a model that is already real.
"""

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import nn

from dsv4.device import KINDS, accelerator, device_count, parse_device
from dsv4.model.cache import CompressedState, LayerCache
from dsv4.model.stats import LayerStats, TrainStats

ROOT = ""
ACCEL = "accel"  # "accel:N": the N-th device of this machine's accelerator, whatever its kind
PLACEABLE = ("embed", "layers.#", "layers.#.ffn", "layers.#.ffn.experts", "layers.#.ffn.shared_experts",
             "layers.#.engram", "layers.#.engram.table", "hc_head", "norm", "head", "mtp.#", "mtp.#.ffn",
             "mtp.#.ffn.experts", "mtp.#.ffn.shared_experts", "mtp.#.hc_head", "mtp.#.norm")
CALLED_BY_MODEL = ("mtp.#.hc_head", "mtp.#.norm")  # Transformer.logits calls these itself, not their block
CHAINED = ("layers.#",)  # outputs stay: the next layer takes them, Transformer moves the last one home
_INDEX = re.compile(r"^(\*|\d+|\d+-\d+)$")


def template(path: str) -> str:
    """layers.7.ffn.experts -> layers.#.ffn.experts (ranges and * too)"""
    return ".".join("#" if _INDEX.match(c) else c for c in path.split(".")) if path else ROOT


def resolve_device(name: str) -> torch.device:
    """A map's device string -> a torch.device of this machine ("accel:N" -> the accelerator's N-th device), with its
    index (asked of dsv4.device). ValueError for a device this machine lacks."""
    check_device(name)
    base, _, index = name.partition(":")
    if base in ("cpu", "meta"):
        return torch.device(name)
    accel = accelerator()
    if base == ACCEL and accel is None:
        raise ValueError(f"device map: {name!r} needs an accelerator, and this machine has none")
    device = parse_device(f"{accel.type}:{index or 0}" if base == ACCEL else name)
    if accel is None or device.type != accel.type:
        raise ValueError(f"device map: {name!r} needs a {device.type} device, and this machine has none")
    if device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    if device.index >= device_count(device.type):
        raise ValueError(f"device map: {name!r}: this machine has {device_count(device.type)} {device.type} device(s)")
    return device


def check_device(name: str) -> None:
    """Syntax only (a map may come from another machine): cpu, meta, accel[:N], or a device type dsv4 knows
    (dsv4.device.KINDS) with an optional index."""
    base, colon, index = name.partition(":")
    if not (base in ("meta", ACCEL) or base in KINDS) or (colon and not index.isdigit()):
        raise ValueError(f"device map: bad device {name!r}: use cpu, accel:N (this machine's N-th accelerator) or "
                         f"one of {', '.join(KINDS)} with an optional :index")


@dataclasses.dataclass(frozen=True)
class _Key:
    text: str
    parts: tuple  # a name, or (lo, hi) for an index, a range or * (hi = -1)
    rank: tuple[int, int, int]  # (components, exact indices, ranges): the larger wins

    @classmethod
    def parse(cls, text: str) -> "_Key":
        parts, exact, ranges = [], 0, 0
        for c in text.split(".") if text else []:
            if c == "*":
                parts.append((0, -1))
            elif _INDEX.match(c):
                lo, _, hi = c.partition("-")
                parts.append((int(lo), int(hi or lo)))
                exact, ranges = exact + (not hi), ranges + bool(hi)
            elif c:
                parts.append(c)
            else:
                raise ValueError(f"device map: bad key {text!r} (an empty component)")
        return cls(text, tuple(parts), (len(parts), exact, ranges))

    def covers(self, comps: list[str]) -> bool:
        """Does this key name `comps` or a module above it?"""
        if len(self.parts) > len(comps):
            return False
        for p, c in zip(self.parts, comps):
            if isinstance(p, str):
                if p != c:
                    return False
            elif not c.isdigit() or int(c) < p[0] or (p[1] >= 0 and int(c) > p[1]):
                return False
        return True


class DeviceMap:
    """Module-path pattern -> device string (see the module docstring). JSON-serialisable through `to_dict`."""

    def __init__(self, entries: Mapping[str, str]):
        self.entries = {str(k): str(v) for k, v in entries.items()}
        if ROOT not in self.entries:
            raise ValueError('device map: needs a default entry "" (the device of everything not named)')
        for key, device in self.entries.items():
            if key != ROOT and template(key) not in PLACEABLE:
                raise ValueError(f"device map: {key!r} is not a placeable module; place one of "
                                 f"{', '.join(PLACEABLE)} (# = an index, a range a-b or *)")
            check_device(device)
        self._keys = [_Key.parse(k) for k in self.entries]

    @classmethod
    def parse(cls, spec) -> "DeviceMap":
        """A DeviceMap, a mapping, JSON text, or the path of a JSON file (a map, or a `dsv4 plan --json` report)."""
        if isinstance(spec, DeviceMap):
            return spec
        if isinstance(spec, str | os.PathLike) and os.path.isfile(spec):
            with open(spec) as f:
                spec = json.load(f)
        elif isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"device map: neither a JSON object nor a file: {spec!r} ({e})") from None
        if isinstance(spec, Mapping) and isinstance(spec.get("device_map"), Mapping):
            spec = spec["device_map"]  # a plan's report
        if not isinstance(spec, Mapping):
            raise ValueError(f"device map: expected a JSON object of module path -> device, got {type(spec).__name__}")
        return cls(spec)

    def to_dict(self) -> dict[str, str]:
        return dict(self.entries)

    def with_devices(self, rename: Callable[[str], str]) -> "DeviceMap":
        """The same map with every device renamed (e.g. accel:N -> meta for a dry run)."""
        return DeviceMap({k: rename(v) for k, v in self.entries.items()})

    def key_of(self, path: str) -> str:
        """The key that decides where module (or tensor) `path` goes."""
        comps = path.split(".") if path else []
        hits = [k for k in self._keys if k.covers(comps)]
        best = max(k.rank for k in hits)
        tied = [k.text for k in hits if k.rank == best]
        if len(tied) > 1:
            raise ValueError(f"device map: keys {tied} are equally specific for {path!r}; make one more specific")
        return tied[0]

    def device_name(self, path: str) -> str:
        return self.entries[self.key_of(path)]

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """-> the model's placeable modules by path; ValueError for a key that names none of them."""
        units = {p: m for p, m in model.named_modules() if p and template(p) in PLACEABLE}
        for key in self._keys:
            if key.text != ROOT and not any(len(p.split(".")) == len(key.parts) and key.covers(p.split("."))
                                            for p in units):
                raise ValueError(f"device map: {key.text!r} names no module of this model")
        return units


def tensor_devices(model: nn.Module, device_map: DeviceMap) -> dict[str, str]:
    """Every parameter and buffer name (tied ones under each name) -> its device string. ValueError when the map
    splits a tied tensor (embedding and head with tie_embeddings) across devices."""
    device_map.check(model)
    out, first = {}, {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        out[name] = device_map.device_name(name)
        other = first.setdefault(id(t), name)
        if out[other] != out[name]:
            raise ValueError(f"device map: {other} and {name} are one tensor (tied) but the map puts them on "
                             f"{out[other]} and {out[name]}; place them together")
    return out


@torch.no_grad()
def materialize(model: nn.Module, device_map) -> "Placement":
    """Give a model built on `meta` uninitialised storage on each tensor's device (ties kept), then attach the
    crossing hooks. Fill it next (load_into, load_state_dict; `init_rope` for the RoPE tables)."""
    return _allocate(model, DeviceMap.parse(device_map), lambda t, d: torch.empty_like(t, device=d))


@torch.no_grad()
def place(model: nn.Module, device_map) -> "Placement":
    """Move an already-built model's tensors to their devices and attach the crossing hooks. Before
    `prepare_decode` (the Engine's): fused weight blocks would stay where they were."""
    return _allocate(model, DeviceMap.parse(device_map), lambda t, d: t.to(d))


def _allocate(model: nn.Module, device_map: DeviceMap, fn) -> "Placement":
    names = tensor_devices(model, device_map)
    devices = {name: resolve_device(name) for name in set(names.values())}
    reallocate(model, lambda name: devices[names[name]], fn)
    return attach(model, device_map)


def reallocate(model: nn.Module, where, fn) -> None:
    """Give every parameter and buffer new storage `fn(old, device)` on the device `where(its name)` says (None: left
    as it is); a tensor several names share (a tied head) stays one."""
    new: dict[int, tuple] = {}  # id(old) -> (old, new): tied tensors stay one (the old kept alive: ids stay unique)
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for name, p in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            device = where(prefix + name)
            if device is not None:
                if id(p) not in new:
                    new[id(p)] = p, nn.Parameter(fn(p.data, device), requires_grad=p.requires_grad)
                setattr(module, name, new[id(p)][1])
        for name, b in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            device = where(prefix + name)
            if device is not None:
                if id(b) not in new:
                    new[id(b)] = b, fn(b, device)
                setattr(module, name, new[id(b)][1])


class Mover:
    """Moves what crosses a boundary to a device: tensors, through tuples, lists, dicts and dataclasses. Counts the
    boundary entries (`calls`, by module path) and the tensors really moved (`moved`)."""
    STATE = (LayerCache, CompressedState)  # written in place: never copied, must already be there
    PASS = (LayerStats, TrainStats)  # filled in by the callee: handed over as they are

    def __init__(self):
        self.calls: Counter = Counter()
        self.moved = 0
        self._rebuilt: dict[torch.device, tuple] = {}  # the last dataclass rebuilt per device (a step, per layer)

    def __call__(self, x, device: torch.device):
        if isinstance(x, torch.Tensor):
            if x.device == device:
                return x
            self.moved += 1
            return x.to(device)
        if isinstance(x, tuple | list):
            items = [self(v, device) for v in x]
            if all(a is b for a, b in zip(items, x)):
                return x
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        if isinstance(x, dict):
            items = {k: self(v, device) for k, v in x.items()}
            return x if all(items[k] is v for k, v in x.items()) else type(x)(items)
        if isinstance(x, self.STATE):
            wrong = {str(t.device) for t in x.tensors() if t.device != device}
            if wrong:
                raise ValueError(f"a KV cache on {', '.join(sorted(wrong))} reached a layer on {device}: build the "
                                 f"KVCache with devices=cache_devices(model) (dsv4.weights.placement)")
            return x
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and not isinstance(x, self.PASS):
            return self._dataclass(x, device)
        return x

    def _dataclass(self, x, device: torch.device):
        cached = self._rebuilt.get(device)
        if cached is not None and cached[0] is x:
            return cached[1]
        fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x) if f.init}
        moved = {k: self(v, device) for k, v in fields.items()}
        if all(moved[k] is v for k, v in fields.items()):
            return x
        y = dataclasses.replace(x, **moved)  # derived fields (a Step's positions) are recomputed there
        self._rebuilt[device] = (x, y)
        return y


def first_device(args, kwargs) -> torch.device | None:
    """The device of the first tensor a module is handed: where its outputs go back to."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, tuple | list) and (d := first_device(x, {})) is not None:
            return d
    return None


class Boundary:
    """The hooks of one placed module: inputs to its device, outputs back to the caller's."""

    def __init__(self, path: str, device: torch.device, mover: Mover, returns: bool = True):
        self.path, self.device, self.mover, self.returns = path, device, mover, returns
        self.caller: torch.device | None = None  # modules are not re-entered, and the engine steps in one thread

    def enter(self, module, args, kwargs):
        self.mover.calls[self.path] += 1
        self.caller = first_device(args, kwargs)
        return self.mover(args, self.device), self.mover(kwargs, self.device)

    def leave(self, module, args, output):
        return output if self.caller is None or not self.returns else self.mover(output, self.caller)


@dataclasses.dataclass
class Placement:
    """A model's placement: its map, the boundaries (module path -> device) and their hooks."""
    device_map: DeviceMap
    boundaries: dict[str, torch.device]
    mover: Mover
    handles: list

    @property
    def calls(self) -> Counter:
        return self.mover.calls

    def remove(self) -> None:
        """Detach the hooks (the tensors stay where they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def caller_of(path: str, units: Mapping[str, nn.Module]) -> str:
    """The placeable module (or the model, "") whose code calls module `path`."""
    if template(path) in CALLED_BY_MODEL:
        return ROOT
    parent = path.rpartition(".")[0]
    while parent and parent not in units:
        parent = parent.rpartition(".")[0]
    return parent


def attach(model: nn.Module, device_map) -> Placement:
    """Hook every boundary of `model` (tensors already placed: `materialize` and `place` call this)."""
    device_map = DeviceMap.parse(device_map)
    units = device_map.check(model)
    mover, boundaries, handles = Mover(), {}, []
    for path, module in units.items():
        key = device_map.key_of(path)
        if key == device_map.key_of(caller_of(path, units)):
            continue
        boundary = Boundary(path, resolve_device(device_map.entries[key]), mover, template(path) not in CHAINED)
        boundaries[path] = boundary.device
        handles += [module.register_forward_pre_hook(boundary.enter, with_kwargs=True),
                    module.register_forward_hook(boundary.leave)]
    return Placement(device_map, boundaries, mover, handles)


def cache_devices(model: nn.Module) -> list[torch.device]:
    """The device of each main and MTP layer, in order: where its KV cache must live (`KVCache(..., devices=)`)."""
    return [layer.attn_norm.weight.device for layer in (*model.layers, *model.mtp)]  # (norms are never quantized)


def main_device(model: nn.Module) -> torch.device:
    """Where the model's own tensors are (the map's "" entry): token ids go in and logits come out there."""
    return model.rope_swa.inv_freq.device
