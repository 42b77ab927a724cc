"""A checkpoint's tensors written shard by shard: model-0000k-of-0000N.safetensors and the index's weight map.

    writer = ShardWriter(tmp_dir, max_shard_bytes=4 * 2**30)
    for name, tensor in tensors:          # in checkpoint order, produced one layer at a time if need be
        writer.add(name, tensor)
    fnames, index = writer.close()

A shard is written (its own contiguous CPU copies, fsynced) as soon as the next tensor would take it past
max_shard_bytes, so a converter that makes its tensors layer by layer (`dsv4 quantize`) holds one layer and one shard,
never the model; save_pretrained writes a model it holds the same way. The shards are named k-of-N once N is known.
Callers write into a temporary directory and move it into place (dsv4.atomic, save_pretrained).
"""

import os

import torch
from safetensors.torch import save_file


def fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 4 * 2**30):
        self.dir, self.max_bytes = os.fspath(directory), max_shard_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = self.total_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, the tensor names it holds)
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"two model tensors map to the same checkpoint name {name!r}")
        self.names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Write the pending tensors as the next shard (no views into a model, no storage shared between names:
        safetensors refuses shared storage, and expert slices of w13 would share it)."""
        fname = f".shard-{len(self.written):05d}.safetensors"
        data = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.pending}
        save_file(data, os.path.join(self.dir, fname), metadata={"format": "pt"})
        del data
        fsync(os.path.join(self.dir, fname))
        self.written.append((fname, [name for name, _ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def close(self) -> tuple[list[str], dict]:
        """Write what is pending, name the shards k-of-N; -> (shard file names, the index as a dict)."""
        if self.pending or not self.written:
            self.flush()
        n = len(self.written)
        fnames = [shard_name(k, n) for k in range(n)]
        for (tmp, _), fname in zip(self.written, fnames):
            os.replace(os.path.join(self.dir, tmp), os.path.join(self.dir, fname))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: fname for (_, names), fname in zip(self.written, fnames) for name in names}}
        return fnames, index
