"""Snapshots of a sharded run, written with torch.distributed.checkpoint (DCP) so that they reshard: saved on N
ranks, resumed on M ranks or in one process.

    run_dir/step-000001200/  .metadata, __R_0.distcp   DCP: every rank writes its shards of the model (fp32 masters)
                                                       and of the optimizer state (same layout as the parameters);
                                                       tensors the ranks share (routing biases, steps) once
                             manifest.json             as a one-process snapshot's (dsv4.train.snapshot), plus
                                                       "format": "dcp" and the world size that wrote it
The tensors' keys are the one-process snapshot's: "model.<name>" and the flattened optimizer and RNG paths, so one
reader serves both formats. The directory is written under a temporary name and renamed by rank 0 once every rank
has written its part (a kill half-way leaves the previous snapshot the newest). A one-process resume reads it whole
(`read_whole`); a sharded resume reads each rank's shards in place (`load_in_place`), whatever sharding wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from dsv4.train.distributed import Dist, local, shard_of
from dsv4.train.snapshot import (
    MANIFEST,
    PREFIX,
    flatten_state,
    list_snapshots,
    rng_state,
    sha256_file,
    snapshot_dir,
    unflatten_state,
)

FORMAT = "dcp"


def save_sharded(run_dir: str | os.PathLike, step: int, model_sd: dict, optimizer_state: dict, d: Dist,
                 meta: dict | None = None, keep: int | None = None) -> str:
    """Write snapshot `step` from every rank (a collective); returns its path."""
    run_dir = os.fspath(run_dir)
    final = snapshot_dir(run_dir, step)
    tmp = d.broadcast(tempfile.mkdtemp(prefix=f".{PREFIX}{step:09d}.tmp-", dir=run_dir) if d.main else None)
    tensors = {f"model.{k}": v.detach() for k, v in model_sd.items()}
    structure = flatten_state(optimizer_state, "opt", tensors, copy=False)
    rng = flatten_state(rng_state(), "rng", tensors, copy=False)
    dcp.save(tensors, checkpoint_id=tmp)
    if d.main:
        files = sorted(n for n in os.listdir(tmp))
        manifest = {"step": step, "format": FORMAT, "world": d.world, "optimizer": structure, "rng": rng,
                    "meta": meta or {}, "aliases": {}, "sha256": {n: sha256_file(os.path.join(tmp, n)) for n in files}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_snapshots(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def _metadata(path: str) -> dict:
    """{key: (shape, dtype)} of every tensor a DCP snapshot holds."""
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: (tuple(m.size), m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}


def read_whole(path: str, manifest: dict) -> dict:
    """A DCP snapshot as whole tensors in this process -> what `dsv4.train.snapshot.load_snapshot` returns."""
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in _metadata(path).items()}
    with warnings.catch_warnings():  # (DCP says that it reads in one process, which is the point)
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(tensors, checkpoint_id=path, no_dist=True)
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return {"step": manifest["step"], "model": model, "optimizer": unflatten_state(manifest["optimizer"], tensors),
            "rng": unflatten_state(manifest["rng"], tensors), "meta": manifest["meta"]}


class _Keys(dict):
    """Unflattens a structure with each tensor replaced by its key."""

    def __missing__(self, key):
        return key


def optimizer_template(structure: dict, optimizer, sizes: dict) -> dict:
    """Tensors to read a saved optimizer state into: for each saved state tensor of parameter p, a zero tensor laid
    out like p (a DTensor shard when p is one) when it has p's shape, else a plain one of the saved shape (steps)."""
    saved = unflatten_state(structure, _Keys())
    template = {}
    for name in ("adamw", "muon", "sparse"):
        sub = getattr(optimizer, name)
        if sub is None or not saved.get(name):
            continue
        params = [p for g in sub.param_groups for p in g["params"]]
        for pid, state in saved[name]["state"].items():
            for key in state.values():
                if not isinstance(key, str) or key not in sizes:
                    continue
                shape, dtype = sizes[key]
                p = params[pid]
                template[key] = (torch.zeros_like(p, dtype=dtype) if shape == tuple(p.shape)
                                 else torch.zeros(shape, dtype=dtype))
    return template


def load_in_place(path: str, manifest: dict, model_sd: dict, optimizer, d: Dist | None) -> dict:
    """Read a snapshot into this rank's (or process's) tensors: the model's `model_sd` (parameters, masters,
    buffers: written in place) and `optimizer` (its state replaced). A DCP snapshot is read shard by shard, whatever
    number of ranks wrote it; a one-process snapshot is read whole and each rank keeps its shards. -> its RNG state
    and metadata."""
    sharded = manifest.get("format") == FORMAT
    if sharded:
        sizes, whole = _metadata(path), None
    else:
        from dsv4.train.snapshot import load_snapshot

        snap = load_snapshot(path, manifest)  # (its checksums were checked with the manifest)
        whole = {f"model.{k}": v for k, v in snap["model"].items()}
        flatten_state(snap["optimizer"], "opt", whole)
        flatten_state(snap["rng"], "rng", whole)
        sizes = {k: (tuple(v.shape), v.dtype) for k, v in whole.items()}
    template = {f"model.{k}": v for k, v in model_sd.items()}
    template.update(optimizer_template(manifest["optimizer"], optimizer, sizes))
    template.update({k: torch.empty(sizes[k][0], dtype=sizes[k][1]) for k in sizes if k.startswith("rng.")})
    if sharded:
        dcp.load(template, checkpoint_id=path, no_dist=d is None)
    else:
        _fill(template, whole)
    optimizer.load_state_dict(unflatten_state(manifest["optimizer"], template))
    return {"step": manifest["step"], "rng": unflatten_state(manifest["rng"], template), "meta": manifest["meta"]}


@torch.no_grad()
def _fill(template: dict, whole: dict) -> None:
    """Copy whole tensors into the template: a DTensor keeps its own shard (no communication: every rank read the
    whole tensor)."""
    missing = sorted(set(template) - set(whole))
    if missing:
        raise ValueError(f"the snapshot lacks {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for key, t in template.items():
        local(t).copy_(shard_of(whole[key], t) if isinstance(t, DTensor) else whole[key])
