"""torch.compile applied to a model from outside, once, when it is prepared for training or inference.

    compile_blocks(model)     training: every block (main and MTP) whole, plus the head's input `model.hidden`
    compile_scan(model)       inference: the lightning indexers' long-context scan block (`scan_block`), one shared copy
    compile_hot_paths(model)  opt-in: the element-wise-heavy methods each module lists in `hot_paths`
    allow_recompiles(n)       the one place that raises dynamo's process-wide recompile limit

The code compiled is the eager code (tests compare the two); what is compiled is found by duck typing, so these
helpers import nothing of the model. A compiled function is cached per plain function (`compiled`), never kept in a
module-level variable.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn


def allow_recompiles(n: int) -> None:
    """Let dynamo keep up to `n` graphs per compiled function (never lowers the limit). Blocks share one code
    object, so every layer kind x routing x training stage of every block counts against the same limit."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, n)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile with static shapes, one copy per process: every module that runs `fn` shares its
    graphs (and a second preparation of the same model compiles nothing new)."""
    return torch.compile(fn, dynamic=False)


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """torch.compile every block (`model.layers`, `model.mtp`) whole, so the element-wise work around the matmuls
    (hyper-connections, norms, RoPE, routing, attention core) fuses in the forward and the backward; and the streams'
    collapse and final norm (`model.hidden`). The first step per block variant compiles (a minute or two for `small`
    on 2 CPU cores; cached on disk by inductor after that); layer kinds, hash routing, the indexer's training stage
    and training vs plain forward are the variants. Returns the model."""
    options.setdefault("dynamic", False)
    blocks = [*model.layers, *model.mtp]
    allow_recompiles(4 * len(blocks))  # blocks x indexer stages x with/without statistics, generously
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    model.hidden = torch.compile(model.hidden, **options)
    return model


def compile_scan(model: nn.Module) -> nn.Module:
    """Every lightning indexer (a module with a `scan_block`) scores its long-context scan blocks through one
    torch.compile'd copy of its class's `scan_block`: a few fixed block shapes, compiled by Engine.warm_up or else at
    the first long prefill, then cached on disk. It fuses the ReLU, the weighted head sum, the mask, the top-k's
    bookkeeping and the merge into passes over cache-sized pieces of the block instead of a dozen eager passes over
    all of it. Returns the model."""
    for module in model.modules():
        plain = getattr(type(module), "scan_block", None)  # the class's plain function (the instance may hold a copy)
        if plain is not None:
            module.scan_block = compiled(plain)
    return model


def compile_hot_paths(model: nn.Module, **options) -> nn.Module:
    """Opt-in: torch.compile the element-wise-heavy methods every module names in its `hot_paths` (mHC mixing and
    Sinkhorn, the attention core, SwiGLU), so their chains of small ops fuse into a few kernels; matmuls are
    unchanged. Needs a C++ compiler on CPU; the first forward per shape compiles (seconds). Returns the model."""
    options.setdefault("dynamic", False)
    for module in model.modules():
        for name in getattr(module, "hot_paths", ()):
            setattr(module, name, torch.compile(getattr(module, name), **options))
    return model
