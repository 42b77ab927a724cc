"""The inference engine: a preallocated cache per sequence slot, continuous batching, per-request sampling, stops and
streaming, MTP speculative decoding. See dsv4.engine.engine.

    engine      Engine: submit / step / cancel, generate and stream
    request     Request, Delta, Completion: a request's state and what it hands back
    sampling    SamplingParams, penalties, filters, draws; MTP draft and verify
    stops       stop strings over streamed text
    load        a checkpoint directory -> model and tokenizer -> Engine
    generate    `dsv4 generate`: one prompt (or a packed source tree) streamed to stdout
    chat        `dsv4 chat`: the terminal chat loop and its history
    terminal    what those two show on stderr: prefill progress, packed-context report, speed
"""

from dsv4.engine.engine import Completion, Delta, Engine
from dsv4.engine.sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "SamplingParams"]
