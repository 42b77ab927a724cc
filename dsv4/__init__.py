"""dsv4: an open, hackable PyTorch implementation of DeepSeek-V4."""

from dsv4.config import PRESETS, ModelArgs
from dsv4.model.transformer import Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer", "from_pretrained", "save_pretrained"]


def from_pretrained(path, device=None, dtype=None) -> Transformer:
    """Load a checkpoint directory (ours, one written by transformers, or DeepSeek's release layout)."""
    from dsv4.weights.checkpoint import from_pretrained as _load

    return _load(path, device=device, dtype=dtype)


def save_pretrained(model: Transformer, path, **kwargs):
    """Write `model` as a checkpoint directory (sharded safetensors + index + config.json; see dsv4.weights)."""
    from dsv4.weights.checkpoint import save_pretrained as _save

    return _save(model, path, **kwargs)
