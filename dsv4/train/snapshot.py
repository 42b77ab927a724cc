"""Training snapshots: everything needed to resume a run exactly, written atomically, verified on load.

    run_dir/step-000001200/  model.safetensors        the model's state_dict (our names, buffers included)
                             optimizer.safetensors    every tensor of the optimizer state, flattened by path
                             manifest.json            step, data position, RNG states, the optimizer state's
                                                      non-tensor structure, user metadata, sha256 of each file
A snapshot is written into a temporary directory next to its final name and renamed into place, so a crash leaves
either the whole snapshot or none. `load_latest` walks snapshots newest first and returns the first whose files
match their checksums, warning about each corrupt or partial one it skips. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dsv4.atomic import atomic_dir

MANIFEST = "manifest.json"
PREFIX = "step-"


def flatten_state(obj, path: str, tensors: dict, copy: bool = True):
    """Nested dict/list state -> JSON-able structure with tensors replaced by {"__tensor__": key}; `tensors` gets
    {key: a CPU copy} (copy=False: the tensor itself, e.g. a DTensor shard for torch.distributed.checkpoint)."""
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous() if copy else obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, f"{path}.k{i}", tensors, copy),
                              flatten_state(v, f"{path}.{i}", tensors, copy)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [flatten_state(v, f"{path}.{i}", tensors, copy) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a snapshot")


def unflatten_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> dict:
    """Python, NumPy and torch (CPU) generator states, as JSON-able values and one tensor."""
    np_state = np.random.get_state()
    return {"python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_dir(run_dir: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(run_dir), f"{PREFIX}{step:09d}")


def save_snapshot(run_dir: str | os.PathLike, step: int, model: torch.nn.Module | dict, optimizer_state: dict,
                  meta: dict | None = None, keep: int | None = None) -> str:
    """Write snapshot `step` atomically; keep only the newest `keep` snapshots if given. Returns its path.
    `model` is a module or a state dict (e.g. with fp32 master weights in place of bf16 parameters)."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    final = snapshot_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        model_sd, aliases = _dedupe(model if isinstance(model, dict) else model.state_dict())
        save_file(model_sd, os.path.join(tmp, "model.safetensors"))
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_structure = flatten_state(optimizer_state, "opt", opt_tensors)
        rng_tensors: dict[str, torch.Tensor] = {}
        rng = flatten_state(rng_state(), "rng", rng_tensors)
        save_file({**opt_tensors, **rng_tensors}, os.path.join(tmp, "optimizer.safetensors"))
        files = {name: sha256_file(os.path.join(tmp, name)) for name in ("model.safetensors", "optimizer.safetensors")}
        manifest = {"step": step, "optimizer": opt_structure, "rng": rng, "meta": meta or {}, "aliases": aliases,
                    "sha256": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
    if keep:
        for old in list_snapshots(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _dedupe(sd: dict) -> tuple[dict, dict]:
    """safetensors refuses shared storage (a tied head): store each storage once under its first name, and
    remember the other names as aliases."""
    first, out, aliases = {}, {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in first:
            aliases[k] = first[key]
        else:
            first[key] = k
            out[k] = v.detach().cpu().contiguous()
    return out, aliases


def list_snapshots(run_dir: str | os.PathLike) -> list[str]:
    """Complete snapshot directories, oldest first (temporary ones are ignored)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if n.startswith(PREFIX))
    return [os.path.join(run_dir, n) for n in names]


def read_manifest(path: str) -> dict:
    """A snapshot's manifest, its files checked against their checksums; ValueError if corrupt."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"snapshot {path}: unreadable manifest ({e})") from None
    for name, digest in manifest.get("sha256", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or sha256_file(file) != digest:
            raise ValueError(f"snapshot {path}: {name} is missing or does not match its checksum (truncated?)")
    return manifest


def load_snapshot(path: str, manifest: dict | None = None) -> dict:
    """Verify and read one snapshot -> {"step", "model", "optimizer", "rng", "meta"} (whole tensors, whatever number
    of processes wrote it); ValueError if corrupt. `manifest`: its manifest, already verified (`read_manifest`)."""
    manifest = read_manifest(path) if manifest is None else manifest
    if manifest.get("format") == "dcp":  # written by a sharded run (dsv4.train.sharded)
        from dsv4.train.sharded import read_whole

        return read_whole(path, manifest)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    model_sd = load_file(os.path.join(path, "model.safetensors"))
    model_sd.update({alias: model_sd[name] for alias, name in manifest.get("aliases", {}).items()})
    return {"step": manifest["step"], "model": model_sd,
            "optimizer": unflatten_state(manifest["optimizer"], tensors),
            "rng": unflatten_state(manifest["rng"], tensors), "meta": manifest["meta"]}


def latest(run_dir: str | os.PathLike) -> tuple[str, dict] | None:
    """(path, manifest) of the newest snapshot whose files match their checksums, or None; corrupt ones are
    reported and skipped."""
    for path in reversed(list_snapshots(run_dir)):
        try:
            return path, read_manifest(path)
        except ValueError as e:
            warnings.warn(f"{e}; falling back to the previous snapshot", stacklevel=2)
    return None


def load_latest(run_dir: str | os.PathLike) -> dict | None:
    """The newest snapshot that verifies, or None if there is none; corrupt ones are reported and skipped."""
    for path in reversed(list_snapshots(run_dir)):
        try:
            return load_snapshot(path)
        except ValueError as e:
            warnings.warn(f"{e}; falling back to the previous snapshot", stacklevel=2)
    return None
