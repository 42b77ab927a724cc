"""The inference engine: a preallocated cache per sequence slot, continuous batching, per-request sampling, stops
and streaming, MTP speculative decoding. See dsv4.engine.engine."""

from dsv4.engine.engine import Completion, Delta, Engine
from dsv4.engine.sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "SamplingParams"]
