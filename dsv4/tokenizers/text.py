"""Byte-level BPE tokenizer (the Rust `tokenizers` package) with DeepSeek's special tokens and chat template.

Trained tokenizers treat numbers as DeepSeek's does: runs of digits are cut into isolated groups of at most three
(" 48213." -> " ", "482", "13", "."), and, when the vocabulary has room (every group at most a quarter of the
merges: 8192 tokens does, tiny's 512 does not), every group of 1-3 digits is a token of its own, as in DeepSeek's
vocabulary. A number's tokens then follow from its digits alone, never from which digit strings the corpus happened
to merge: a 5-digit pass key is always a 3-digit and a 2-digit token.

Byte-level means every byte has a token, so any input round-trips: ordinary Unicode through the Rust encoder, and
lone surrogates (bytes decoded with `surrogateescape`) through their single-byte tokens. Special tokens are only ever
produced from their spelling when `allow_special=True`; plain text containing `<｜User｜>` encodes as text (a
release's tokenizer.json may leave some of its tokens unmarked as special: those match in plain text too).

Chat format of our tokenizers (DeepSeek-V3 / R1 `tokenizer_config.json`):
    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...
with `<think>\\n` opening the generation prompt when thinking is on (R1), `</think>` closing it in the answer.

Any other tokenizer.json (a DeepSeek release checkpoint's) is used as is, ids unchanged, and its chats take the
release's own format (`dsv4.tokenizers.release_chat`), so released weights get the prompts they were trained on. Ours
are told apart by the layout `train` always writes: our chat tokens (`special_tokens()`, BOS to EOV) are ids 0-10 in
that order, which a vocabulary trained elsewhere has no reason to have (a release's holds BPE tokens there).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

from dsv4.atomic import atomic_path

if TYPE_CHECKING:
    from dsv4.tokenizers.stream import StreamDecoder

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
BOI, EOI, BOV, EOV = "<｜begin▁of▁image｜>", "<｜end▁of▁image｜>", "<｜begin▁of▁video｜>", "<｜end▁of▁video｜>"


NUMBER_GROUPS = [f"{i:0{n}d}" for n in (1, 2, 3) for i in range(10 ** n)]  # "0".."9", "00".."99", "000".."999"
NUMBER_COUNT = 1000  # how often each group is shown to the BPE trainer: far above any merge near the vocabulary's end


def special_tokens(n_vis: int = 64) -> list[str]:
    """Our special tokens in id order (they take ids 0..len-1); the visual-code slots come last so a later, larger
    visual codebook can take its own range after the BPE vocabulary without renumbering anything here."""
    visual = [f"<｜vis_{i}｜>" for i in range(n_vis)]
    return [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, BOI, EOI, BOV, EOV] + visual


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which `pre_tokenizers.ByteLevel` uses for its alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_SURROGATES = re.compile("[\udc80-\udcff]+")


class Tokenizer:
    def __init__(self, tok: _RustTokenizer):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.special_ids = sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self.bos_id, self.eos_id = vocab.get(BOS), vocab.get(EOS)
        self.pad_id = vocab.get(PAD, self.eos_id)
        self.special_text = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        ours = special_tokens(0)
        self.release = [self.special_text.get(i) for i in range(len(ours))] != ours  # see the module's docstring
        # byte-level models decode by our own byte table, so invalid UTF-8 survives via surrogateescape
        self.byte_ids = None
        b2c = byte_to_char()
        if isinstance(tok.decoder, decoders.ByteLevel) and all(c in vocab for c in b2c.values()):
            self.byte_ids = {b: vocab[c] for b, c in b2c.items()}
            c2b = {c: b for b, c in b2c.items()}
            self.id_bytes = {i: bytes(c2b[c] for c in t) for t, i in vocab.items()
                              if i not in self.special_text and all(c in c2b for c in t)}

    # ---- building, loading, saving ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None,
              n_vis: int = 64) -> Tokenizer:
        tok = _RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),  # DeepSeek's digit groups
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        specials = special_tokens(n_vis)
        if vocab_size - 256 - len(specials) >= 4 * len(NUMBER_GROUPS):  # room for every digit group as a token
            texts = itertools.chain(texts, [" ".join(NUMBER_GROUPS)] * NUMBER_COUNT)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        out = cls(tok)
        if path is not None:
            out.save(path)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Ours, or a release's tokenizer.json (used as is, with the release's chat format)."""
        return cls(_RustTokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            self.tok.save(tmp)

    def hash(self) -> str:
        """Content hash of the whole tokenizer (vocab, merges, specials): a token file is valid only for this."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    # ---- encoding ----
    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if not text:
            return []
        self.tok.encode_special_tokens = not allow_special  # True = spell special tokens as ordinary text
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if self.byte_ids is None or not _SURROGATES.search(text):
            return self._encode_text(text, allow_special)
        ids, pos = [], 0  # lone surrogates (undecodable bytes) become their single-byte tokens
        for m in _SURROGATES.finditer(text):
            ids += self._encode_text(text[pos:m.start()], allow_special)
            ids += [self.byte_ids[b] for b in m.group().encode("utf-8", "surrogateescape")]
            pos = m.end()
        return ids + self._encode_text(text[pos:], allow_special)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.byte_ids is None:
            return self.tok.decode(ids, skip_special_tokens=False)
        out, buf = [], bytearray()
        for i in ids:
            if i in self.special_text:
                out.append(buf.decode("utf-8", "surrogateescape"))
                buf.clear()
                out.append(self.special_text[i])
            else:
                buf += self.id_bytes.get(i, b"")
        out.append(buf.decode("utf-8", "surrogateescape"))
        return "".join(out)

    def stream(self, errors: str = "surrogateescape") -> StreamDecoder:
        """An incremental decoder for generated tokens: see `dsv4.tokenizers.stream.StreamDecoder`."""
        from dsv4.tokenizers.stream import StreamDecoder

        return StreamDecoder(self, errors)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i

    # ---- chat ----
    def _chat_pieces(self, messages: list[dict], add_generation_prompt: bool, thinking: bool,
                     reasoning_effort: str | None = None) -> list[tuple[str, bool, bool]]:
        """(text, is_special_markup, is_answer) pieces; special markup is encoded with allow_special. A release
        tokenizer renders the release's format, which also reads reasoning_content, tool calls, tool results and
        reasoning_effort (our format has none of these) and, as the release, reads token spellings in messages as
        tokens."""
        if self.release:
            from dsv4.tokenizers.release_chat import chat_pieces

            return chat_pieces(messages, thinking, add_generation_prompt, reasoning_effort=reasoning_effort)
        pieces = [(BOS, True, False)]
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                pieces.append((content, False, False))
            elif role == "user":
                pieces += [(USER, True, False), (content, False, False)]
            elif role == "assistant":
                pieces += [(ASSISTANT, True, False), (content, False, True), (EOS, True, True)]
            else:
                raise ValueError(f"unknown chat role {role!r}")
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            pieces.append((ASSISTANT, True, False))
            if thinking:
                pieces.append((THINK + "\n", True, False))
        return pieces

    def chat_template(self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False,
                      reasoning_effort: str | None = None) -> str:
        return "".join(t for t, _, _ in self._chat_pieces(messages, add_generation_prompt, thinking, reasoning_effort))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, thinking: bool = False,
                    reasoning_effort: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids and a loss mask that is 1 exactly on assistant answers and their end-of-sentence (with a
        release tokenizer: on all the assistant wrote, reasoning and tool calls included)."""
        ids, mask = [], []
        for text, special, answer in self._chat_pieces(messages, add_generation_prompt, thinking, reasoning_effort):
            piece = self.encode(text, allow_special=special)
            ids += piece
            mask += [int(answer)] * len(piece)
        return ids, mask


class IdsOnly:
    """What the engine needs of a tokenizer, for prompts given as token ids when there is no tokenizer (benchmarks
    and tests on random weights): no end-of-text token, and a stream decoder that shows no text."""
    eos_id = None

    def stream(self, errors: str = "replace") -> IdsOnly:
        return self  # (stateless: one serves every request)

    def push(self, ids) -> str:
        return ""

    def flush(self) -> str:
        return ""
