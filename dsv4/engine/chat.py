"""`dsv4 chat`: a terminal chat. Each turn is rendered with the chat template together with the history, and the
answer streams to stdout as it is generated; messages to the user go to stderr.

    /reset      clears the history (the system prompt stays)
    /exit       quits, as does end of input (Ctrl-D)
    Ctrl-C      stops an answer without quitting (what was said so far stays in the history)

When the history no longer fits the context, the oldest turns (a question and its answer) are forgotten; a message
too long for the context even alone is refused and not kept. `context_dir` packs a source tree into the system prompt,
leaving CHAT_TURNS_RESERVE tokens for the conversation.
"""

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dsv4.engine.engine import Engine
from dsv4.engine.load import context_len, load_engine, load_model
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.terminal import PrefillBar, pack_context

CHAT_TURNS_RESERVE = 2048  # tokens of the context kept for the conversation when --context-dir fills the rest
DEFAULT_MAX_LEN = 8192  # the cache's context when neither max_len nor context_dir says otherwise


@dataclass
class Conversation:
    """The messages the chat template renders: the system prompt (kept for good), then user/assistant turns."""
    tokenizer: object
    system: str | None = None
    thinking: bool = False
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def encode(self) -> list[int]:
        return self.tokenizer.encode_chat(self.messages(), add_generation_prompt=True, thinking=self.thinking)[0]

    def ask(self, text: str, budget: int, limit: int) -> list[int] | None:
        """Add the user's message -> the prompt, forgetting the oldest turns until it is at most `budget` tokens; or
        None (and the message is not kept) when it is still `limit` tokens or more."""
        self.turns.append({"role": "user", "content": text})
        ids = self.encode()
        while len(ids) > budget and len(self.turns) > 1:
            del self.turns[:2]
            ids = self.encode()
            print("(the oldest turn no longer fits the context and was dropped)", file=sys.stderr)
        if len(ids) >= limit:
            print(f"(that message is too long: {len(ids)} tokens, the context holds {limit})", file=sys.stderr)
            self.turns.pop()
            return None
        return ids

    def answer(self, text: str):
        self.turns.append({"role": "assistant", "content": text})

    def reset(self):
        self.turns.clear()


def read_line(read: Callable[[str], str]) -> str | None:
    """The user's next line; None at the end of input; "" after Ctrl-C (which quits nothing)."""
    try:
        return read("you> ")
    except EOFError:
        print(file=sys.stderr)
        return None
    except KeyboardInterrupt:
        print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
        return ""


def stream_answer(engine: Engine, ids: list[int], params: SamplingParams, max_new_tokens: int,
                  stop: Sequence[str]) -> str:
    """The answer to the prompt `ids`, written to stdout as it comes; Ctrl-C stops it (and frees its cache slot)."""
    answer = []
    stream = engine.stream(ids, params, progress=PrefillBar(), max_new_tokens=max_new_tokens, stop=stop)
    sys.stdout.write("dsv4> ")
    try:
        for delta in stream:
            answer.append(delta.text)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # cancels the request and frees its cache slot
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return "".join(answer)


def open_engine(ckpt, system: str | None, context_dir: str | None, max_new_tokens: int, max_len: int | None,
                device: str | None, dtype: str, compile: bool | str, speculative: bool | None,
                device_map=None, prefix_cache_gb: float = 0.0) -> tuple[Engine, str | None]:
    """The engine for a chat, and its system prompt: with a context_dir, the tree packed after `system` into what the
    context leaves beside the turns, and the cache as long as the model's context (unless max_len says otherwise)."""
    model, tok = load_model(ckpt, device, dtype, device_map=device_map,
                            max_len=max_len or (None if context_dir else DEFAULT_MAX_LEN))
    default_len = DEFAULT_MAX_LEN
    if context_dir:
        default_len = context_len(model, max_len)
        budget = default_len - max_new_tokens - CHAT_TURNS_RESERVE - len(tok.encode(system or ""))
        packed = pack_context(context_dir, tok, budget)
        system = (system + "\n\n" if system else "") + "The repository:\n" + packed.text
    engine = load_engine(model, tok, max_len=max_len or default_len, compile=compile, speculative=speculative,
                         prefix_cache_gb=prefix_cache_gb)
    return engine, system


def chat(ckpt: str | os.PathLike, *, system: str | None = None, thinking: bool = False, context_dir: str | None = None,
         params: SamplingParams | None = None, max_new_tokens: int = 256, stop: Sequence[str] = (),
         max_len: int | None = None, device: str | None = None, dtype: str = "auto", compile: bool | str = False,
         speculative: bool | None = None, device_map=None, read: Callable[[str], str] = input,
         prefix_cache_gb: float = 0.0) -> int:
    """Chat with the checkpoint's model until /exit or the end of input (`read` gives the user's lines) -> 0."""
    engine, system = open_engine(ckpt, system, context_dir, max_new_tokens, max_len, device, dtype, compile,
                                 speculative, device_map, prefix_cache_gb)
    params = params or SamplingParams(temperature=0.7)
    conversation = Conversation(engine.tokenizer, system, thinking)
    print(f"dsv4 chat: {ckpt} (/reset clears the history, /exit quits, Ctrl-C stops an answer)", file=sys.stderr)
    while (line := read_line(read)) is not None:
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            conversation.reset()
            print("(history cleared)", file=sys.stderr)
        elif command:
            ids = conversation.ask(line, engine.max_len - max_new_tokens, engine.max_len)
            if ids is not None:
                conversation.answer(stream_answer(engine, ids, params, max_new_tokens, stop))
    return 0
