"""dsv4: an open, hackable PyTorch implementation of DeepSeek-V4."""

from dsv4.config import ModelArgs, PRESETS
from dsv4.model.transformer import Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer", "from_pretrained"]


def from_pretrained(path, device=None, dtype=None) -> Transformer:
    """Load a checkpoint directory (ours, one written by transformers, or DeepSeek's release layout)."""
    from dsv4.checkpoint import from_pretrained as _load

    return _load(path, device=device, dtype=dtype)
