"""Streaming detokenization: token ids in, text deltas out, never splitting a multi-byte character."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from dsv4.tokenizers.text import Tokenizer


class StreamDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte character: the bytes of a character that is still
    incomplete wait for the next tokens. Concatenated deltas + `flush()` equal `Tokenizer.decode` of all the ids
    (errors="surrogateescape", the default); errors="replace" turns bytes that can never form a character into
    U+FFFD instead, so every delta is valid UTF-8 (what a server streams)."""

    def __init__(self, tokenizer: Tokenizer, errors: str = "surrogateescape"):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors)

    def push(self, ids: int | Iterable[int]) -> str:
        """Feed the next token id(s); -> the text they complete (possibly empty)."""
        tok = self.tokenizer
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        if tok.byte_ids is None:  # not byte-level (no real V4 tokenizer): each push decoded on its own, no hold-back
            return tok.tok.decode(ids, skip_special_tokens=False)
        out = []
        for i in ids:
            if i in tok.special_text:
                out += [self._utf8.decode(b"", final=True), tok.special_text[i]]
            else:
                out.append(self._utf8.decode(tok.id_bytes.get(i, b"")))
        return "".join(out)

    def flush(self) -> str:
        """The end of the stream: bytes still waiting are decoded as they are."""
        return self._utf8.decode(b"", final=True)
