"""Tokenizers: text (byte-level BPE + DeepSeek's chat template) and streaming detokenization."""

from dsv4.tokenizers.stream import StreamDecoder
from dsv4.tokenizers.text import Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
