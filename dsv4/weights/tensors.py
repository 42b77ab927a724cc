"""What a checkpoint directory stores, read from its safetensors headers alone (`_scan`), and single tensors by our
name whatever the layout stored them under (`read_tensor`, or `mmap_tensor`: copy-on-write pages read when touched).
dsv4.weights.checkpoint loads whole models with these."""

import dataclasses
import json
import os
import struct

import numpy as np
import torch
from safetensors import safe_open

from dsv4.weights.names import resolve

INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass
class _Entry:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3", "I8"


_FP8_ST = {"F8_E4M3", "F8_E5M2"}
_FP4_ST = {"I8", "U8", "F4"}  # packed e2m1 bytes
_INT_ST = {"I8", "U8", "I16", "I32", "I64", "U16", "U32", "U64", "BOOL"}


def _scan(path: str) -> dict[str, _Entry]:
    """tensor name -> (file, shape, dtype) from the safetensors headers alone."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            listed = set(json.load(f)["weight_map"].values())
        absent = sorted(listed - set(files))
        if absent:
            raise FileNotFoundError(f"{path}: {INDEX_FILE} lists shard(s) that are not there: {', '.join(absent)}")
        files = sorted(listed)
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    entries, twice = {}, []
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                if name in entries:
                    twice.append(f"{name} (in {entries[name].file} and {fname})")
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if dtype == "F4":  # the header counts e2m1 values; torch's float4_e2m1fn_x2 tensor holds bytes
                    shape = (*shape[:-1], shape[-1] // 2)
                entries[name] = _Entry(fname, shape, dtype)
    if twice:
        raise ValueError(f"{path}: tensor(s) stored in more than one shard: {_listing(twice)}")
    return entries


_MMAP_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64),
                "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8), "F8_E4M3": (np.uint8, torch.float8_e4m3fn)}


def mappable(entry: _Entry, dtype: torch.dtype) -> bool:
    """Whether a stored tensor memory-maps as a tensor of `dtype` as it is (no cast, bytes in the tensor's layout)."""
    return entry.dtype in _MMAP_DTYPES and _MMAP_DTYPES[entry.dtype][1] == dtype and all(entry.shape)


def _mmap_entry(path: str, entry: _Entry, stored: str) -> torch.Tensor:
    """A stored tensor as a copy-on-write memory map of its file: pages are read when touched, writes stay private."""
    fname = os.path.join(path, entry.file)
    with open(fname, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin = json.loads(f.read(n))[stored]["data_offsets"][0]
    if entry.dtype not in _MMAP_DTYPES:
        raise ValueError(f"{stored} is stored as {entry.dtype}, which cannot be memory-mapped as it is")
    np_dtype, dtype = _MMAP_DTYPES[entry.dtype]
    array = np.memmap(fname, dtype=np_dtype, mode="c", offset=8 + n + begin, shape=entry.shape)
    return torch.from_numpy(array).view(dtype)


def _find(path: str, name: str) -> tuple[str, _Entry]:
    """(stored name, entry) of the tensor our model calls `name`, whatever the layout stored it as."""
    for stored, entry in _scan(path).items():
        target = resolve(stored)
        if target is not None and target.param == name and target.expert is None:
            return stored, entry
    raise KeyError(f"{path} holds no tensor {name!r}")


def mmap_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor of a checkpoint directory (by our name, any layout) memory-mapped rather than read."""
    stored, entry = _find(os.fspath(path), name)
    return _mmap_entry(os.fspath(path), entry, stored)


def read_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor of a checkpoint directory, by our name (whatever the layout stored it as), read alone."""
    stored, entry = _find(os.fspath(path), name)
    with safe_open(os.path.join(os.fspath(path), entry.file), framework="pt") as f:
        return f.get_tensor(stored)


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
