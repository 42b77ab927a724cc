"""Decoding constrained to one JSON object: what `response_format: {"type": "json_object"}` asks of the server.

At each step a request may sample only the tokens whose bytes keep its output a prefix of one JSON object (RFC
8259: objects, arrays, strings with escapes and well-formed UTF-8, numbers, true/false/null, whitespace between
tokens), and once the
object is closed only the end-of-text token, so every answer that ends on its own parses with `json.loads`. The
check runs on bytes (byte-level BPE: non-ASCII bytes are string content), one byte at a time through a small
push-down recogniser; a state is (open containers, mode, detail), and the set of tokens allowed in a state is
computed once per vocabulary and remembered (`JsonVocab`), so a step costs one lookup once the common states have
been seen (inside a string, after a key, between values).
"""

from __future__ import annotations

import torch

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# a number's parts (after "-", a leading 0, integer digits, ".", fraction digits, "e", the exponent's sign, its
# digits) and those it may end after
NUMBER_ENDS = frozenset(("zero", "int", "frac", "exp"))

START = ("", "top", None)  # (open containers: "o" object / "a" array, mode, detail)
DONE = ("", "done", None)


def _after_value(stack: str) -> tuple:
    return DONE if not stack else (stack, "after", None)


def utf8_lead(b: int) -> tuple[int, int, int] | None:
    """A UTF-8 lead byte -> (continuation bytes it needs, the first one's range), as RFC 3629 allows (no overlong
    forms, no surrogates, nothing above U+10FFFF); None for a byte that cannot start a character."""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if 0xE0 <= b <= 0xEF:
        return 2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF
    if 0xF0 <= b <= 0xF4:
        return 3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF
    return None


def _value(stack: str, b: int) -> tuple | None:
    """The state after byte b starts a value."""
    if b == ord("{"):
        return stack + "o", "obj_first", None
    if b == ord("["):
        return stack + "a", "arr_first", None
    if b == ord('"'):
        return stack, "string", (False, 0, 0, 0)
    if b == ord("-"):
        return stack, "number", "sign"
    if b in DIGITS:
        return stack, "number", "zero" if b == ord("0") else "int"
    if b in LITERALS:
        return stack, "literal", LITERALS[b]
    return None


def _number(part: str, b: int) -> str | None:
    """The number's next part after byte b, or None when b cannot continue it."""
    digit = b in DIGITS
    if part == "sign":
        return ("zero" if b == ord("0") else "int") if digit else None
    if part in ("zero", "int", "frac"):
        if digit and part != "zero":
            return part
        if b == ord(".") and part != "frac":
            return "dot"
        return "e" if b in (ord("e"), ord("E")) else None
    if part == "dot":
        return "frac" if digit else None
    if part == "e":
        return "exp" if digit else ("esign" if b in (ord("+"), ord("-")) else None)
    if part in ("esign", "exp"):
        return "exp" if digit else None
    return None


def step(state: tuple, b: int) -> tuple | None:
    """The recogniser's state after byte b, or None when b cannot continue a JSON object."""
    stack, mode, detail = state
    if mode == "string":  # detail: (a key?, UTF-8 continuation bytes still due, the next one's range)
        key, due, lo, hi = detail
        if due:
            return (stack, "string", (key, due - 1, 0x80, 0xBF)) if lo <= b <= hi else None
        if b == ord('"'):
            return (stack, "colon", None) if key else _after_value(stack)
        if b == ord("\\"):
            return stack, "escape", key
        if b >= 0x80:
            lead = utf8_lead(b)
            return (stack, "string", (key, *lead)) if lead else None
        return None if b < 0x20 else state
    if mode == "escape":
        if b == ord("u"):
            return stack, "hex", (detail, 4)
        return (stack, "string", (detail, 0, 0, 0)) if b in ESCAPES else None
    if mode == "hex":
        key, left = detail
        if b not in HEX:
            return None
        return (stack, "string", (key, 0, 0, 0)) if left == 1 else (stack, "hex", (key, left - 1))
    if mode == "number":
        part = _number(detail, b)
        if part is not None:
            return stack, "number", part
        return step(_after_value(stack), b) if detail in NUMBER_ENDS else None  # b ends it: read b after it
    if mode == "literal":
        if b != detail[0]:
            return None
        return (stack, "literal", detail[1:]) if len(detail) > 1 else _after_value(stack)
    if b in WHITESPACE:
        return state
    if mode == "top":
        return ("o", "obj_first", None) if b == ord("{") else None
    if mode in ("obj_first", "key"):
        if b == ord('"'):
            return stack, "string", (True, 0, 0, 0)
        return _after_value(stack[:-1]) if b == ord("}") and mode == "obj_first" else None
    if mode == "colon":
        return (stack, "value", None) if b == ord(":") else None
    if mode == "arr_first" and b == ord("]"):
        return _after_value(stack[:-1])
    if mode in ("value", "arr_first"):
        return _value(stack, b)
    if mode == "after":
        if b == ord(","):
            return stack, "key" if stack[-1] == "o" else "value", None
        if b == (ord("}") if stack[-1] == "o" else ord("]")):
            return _after_value(stack[:-1])
    return None


def advance(state: tuple, data: bytes) -> tuple | None:
    for b in data:
        state = step(state, b)
        if state is None:
            return None
    return state


class JsonVocab:
    """A tokenizer's ordinary tokens as bytes, and the tokens allowed in each recogniser state (computed on first
    use). One per server; every JSON-mode request shares it."""

    def __init__(self, tokenizer):
        if getattr(tokenizer, "id_bytes", None) is None:
            raise ValueError("JSON mode needs a byte-level tokenizer")
        self.size = max([*tokenizer.id_bytes, *tokenizer.special_text]) + 1
        self.eos = tokenizer.eos_id
        self.tokens = [(i, b) for i, b in tokenizer.id_bytes.items() if b]
        self.by_id = dict(self.tokens)
        self._allowed: dict[tuple, torch.Tensor] = {}

    def allowed(self, state: tuple) -> torch.Tensor:
        """[size] bool: the tokens that keep a JSON object possible from `state` (only end-of-text once done)."""
        mask = self._allowed.get(state)
        if mask is None:
            mask = torch.zeros(self.size, dtype=torch.bool)
            if state == DONE:
                mask[self.eos] = True
            else:
                ids = [i for i, data in self.tokens if advance(state, data) is not None]
                mask[ids] = True
            self._allowed[state] = mask
        return mask

    def processor(self) -> JsonObject:
        return JsonObject(self)


class JsonObject:
    """One request's constraint (a `dsv4.engine.request.LogitsProcessor`)."""

    def __init__(self, vocab: JsonVocab):
        self.vocab, self.state, self.done = vocab, START, False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.vocab.allowed(self.state).to(logits.device)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        n = min(len(allowed), logits.shape[-1])
        keep[:n] = allowed[:n]
        return logits.masked_fill(~keep, float("-inf"))

    def advance(self, token: int) -> None:
        if self.state == DONE:
            self.done = token == self.vocab.eos
            return
        data = self.vocab.by_id.get(token)
        new = advance(self.state, data) if data is not None else None
        if new is None:
            raise ValueError(f"token {token} does not continue a JSON object (its logits were masked)")
        self.state = new
