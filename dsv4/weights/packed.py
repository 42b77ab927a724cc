"""The release's FP8 and FP4 weights kept as they are stored: V4-Flash is 284B parameters, ~160 GB as released and
~570 GB decoded to bf16, so a machine with one card and a few hundred GB of RAM runs it only packed.

    model = from_pretrained(release_dir, device_map=..., keep_packed=True)

`keep_stored_formats` reads the checkpoint's headers and, on the `meta` model before it is materialised, turns
    every Linear whose weight is stored FP8 e4m3 with 128 x 128 block scales  -> an fp8 QuantLinear
    every routed-experts module whose experts are stored packed FP4 (+ scales) -> fp4 experts
(dsv4.kernels.qweight has the formats; the products decode the codes per matmul). The loader then copies the codes
as stored and the scales decoded from ue8m0 (exact: powers of two) into the model's scale tensors. Everything stored
otherwise (bf16 norms, the embedding, a checkpoint with other blocks) loads as before, decoded to the compute dtype.
"""

import torch
from torch import nn

from dsv4.kernels import quant
from dsv4.kernels.fused import Linear
from dsv4.model.moe import Experts
from dsv4.model.quantized import quantize_modules
from dsv4.weights.names import Target, resolve, scale_owner

FP8_STORED, FP4_STORED = {"F8_E4M3"}, {"I8", "U8", "F4"}


def stored_formats(entries: dict, model: nn.Module) -> dict[str, str]:
    """{module path: "fp8" | "fp4"} for the modules whose weights the checkpoint stores in a release format, from the
    headers alone (`entries`: name -> an entry with .dtype and .shape)."""
    names = set(entries)
    scaled = {w for n in names if (w := scale_owner(n, names)) is not None}
    modules = dict(model.named_modules())
    found: dict[str, set] = {}
    for name in scaled:
        t = resolve(name)
        if t is None:
            continue
        path = t.param.rsplit(".", 1)[0]
        dtype = entries[name].dtype
        blocks = tuple(quant.fp8_scale_shape(entries[name].shape))  # 128 x 128: the only blocks the products take
        if t.expert is None and isinstance(modules.get(path), Linear) and dtype in FP8_STORED \
                and entries[name[: -len("weight")] + "scale"].shape == blocks:
            found.setdefault(path, set()).add("fp8")
        elif t.expert is not None and isinstance(modules.get(path), Experts):
            found.setdefault(path, set()).add("fp4" if dtype in FP4_STORED else "other")
    experts = {p: len(modules[p].w13) for p in found if isinstance(modules[p], Experts)}
    return {p: f.pop() for p, f in found.items() if len(f) == 1 and "other" not in f
            and (p not in experts or _all_experts_packed(entries, p, experts[p]))}


def _all_experts_packed(entries: dict, path: str, n: int) -> bool:
    """Every expert's w1, w2 and w3 stored packed with a scale (a module is kept packed whole, or not at all)."""
    want = {f"{path}.{e}.{w}.{leaf}" for e in range(n) for w in ("w1", "w2", "w3") for leaf in ("weight", "scale")}
    return want <= set(entries) and all(entries[n].dtype in FP4_STORED for n in want if n.endswith("weight"))


def keep_stored_formats(model: nn.Module, entries: dict) -> dict[str, str]:
    """Quantize (on `meta`) the modules the checkpoint stores packed into the same formats; returns what it did."""
    formats = stored_formats(entries, model)
    if formats:
        quantize_modules(model, formats)
        model.quantization = {"quant_method": "release", "formats": sorted(set(formats.values()))}
    return formats


def scale_target(t: Target) -> Target:
    """The model tensor that keeps the scales of a packed weight: `X.weight` -> `X.scale`, `experts.w13` ->
    `experts.w13_scale` (the same expert and part)."""
    if t.param.endswith(".weight"):
        return Target(t.param[: -len("weight")] + "scale")
    return Target(t.param + "_scale", t.expert, t.part)


def is_codes(dest: torch.Tensor) -> bool:
    """Whether a model tensor holds quantized codes (copied as stored, never decoded)."""
    return dest.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn)


def as_stored(tensor: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """A stored tensor as the model keeps it: packed FP4 bytes as uint8, ue8m0 scales as fp32 (exact)."""
    if dest.dtype == torch.uint8 and tensor.dtype in (torch.int8, torch.float4_e2m1fn_x2):
        return tensor.view(torch.uint8)
    if tensor.dtype == torch.float8_e8m0fnu:
        return quant.scale_to_float(tensor)
    return tensor
