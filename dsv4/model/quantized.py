"""Weight-only quantization of a model in memory: which layers, in which format.

    quantize_model(model, "int8")          every Linear but the head -> QuantLinear; routed experts -> quantized codes

Quantized: the linear layers (attention's projections, compressors, indexer, shared experts, MTP projections, Engram's
key and value, and the head in the 8-bit formats) and the routed experts, weight-only: activations, the caches and the
residual streams keep their dtypes. Kept dense: the embedding (a lookup), the head in the 4-bit formats (the one
matrix every logit goes through, where 4-bit error costs the most bits per byte; small next to the experts in any
real model), the router (fp32 by design) and the small fp32 parameters (norms, hyper-connections, sinks). A layer
whose input dim the format's group does not divide takes the largest smaller group that does (groups of 32 for a
104-wide expert: 8); one that not even 8 divides stays dense and is listed in the report. A head tied to the
embedding is untied by quantizing it (the embedding stays dense).

Run on a model built on `meta`, the same calls give the empty quantized buffers that a quantized checkpoint fills
(dsv4.weights.checkpoint reads `quantization_config` and calls this before loading).
"""

from dataclasses import dataclass, field

from torch import nn

from dsv4.kernels.fused import Linear, LinearGroup, QuantLinear
from dsv4.kernels.quant import INT4_GROUP
from dsv4.kernels.qweight import FORMATS, fitting_group
from dsv4.model.moe import Experts

KEEP_DENSE_4BIT = ("head",)  # module names (last component) the 4-bit formats leave dense


@dataclass
class QuantReport:
    fmt: str
    group: int
    quantized: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)  # layers the format's groups do not fit


def fits(fmt: str, in_features: int, group: int) -> bool:
    """Whether an input dim of `in_features` divides into the format's groups (or a smaller fallback group: see
    dsv4.kernels.qweight.fitting_group)."""
    return fitting_group(fmt, in_features, group) is not None


def quantize_model(model: nn.Module, fmt: str, group: int = INT4_GROUP) -> QuantReport:
    """Quantize `model`'s linear layers and routed experts in place (see the module docstring); the model remembers
    its format in `model.quantization` (what save_pretrained writes to config.json). Returns what was done."""
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['format']})")
    report = choose(model, fmt, group)
    quantize_modules(model, dict.fromkeys(report.quantized, fmt), group)
    model.quantization = {"quant_method": "dsv4", "format": fmt, "group_size": group}
    return report


def choose(model: nn.Module, fmt: str, group: int = INT4_GROUP) -> QuantReport:
    """Which modules quantize_model quantizes and which it keeps dense because the groups do not fit, from the shapes
    alone (a model on `meta` answers too)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    report = QuantReport(fmt, group)
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if type(module) is Linear and not (fmt in ("int4", "fp4") and name in KEEP_DENSE_4BIT):
            width = (module.in_features,)
        elif isinstance(module, Experts) and module.fmt is None:
            width = (module.w13.shape[-1], module.w2.shape[-1])
        else:
            continue
        (report.quantized if all(fits(fmt, w, group) for w in width) else report.dense).append(path)
    return report


def quantize_modules(model: nn.Module, formats: dict[str, str], group: int = INT4_GROUP) -> None:
    """Quantize the modules named in `formats` ({path: format}: Linears become QuantLinears, routed experts keep
    codes) in place, and point the LinearGroups that hold a replaced layer at its replacement."""
    swapped: dict[int, QuantLinear] = {}
    for path, fmt in formats.items():
        module = model.get_submodule(path)
        if isinstance(module, Experts):
            module.quantize(fmt, group)
            continue
        owner, _, name = path.rpartition(".")
        swapped[id(module)] = QuantLinear.from_linear(module, fmt, group)
        setattr(model.get_submodule(owner), name, swapped[id(module)])
    _relink_groups(model, swapped)


def _relink_groups(model: nn.Module, swapped: dict[int, QuantLinear]) -> None:
    """LinearGroups hold their layers: point them at the quantized ones (and drop a stale fused block)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearGroup) and any(id(m) in swapped for m in value.linears):
                value.linears = tuple(swapped.get(id(m), m) for m in value.linears)
                value.block = None


def quantize_as_configured(model: nn.Module, config: dict) -> None:
    """Quantize a model (built on `meta`, before loading) as a checkpoint's config.json says `dsv4 quantize` wrote it
    (`quantization_config` with quant_method "dsv4"); anything else leaves it as it is."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "dsv4":
        quantize_model(model, q["format"], q.get("group_size", INT4_GROUP))


def saved_quantization(model: nn.Module, layout: str) -> dict | None:
    """The `quantization_config` a checkpoint of `model` records (None: not quantized), once it is sure the model can
    be saved in `layout`: quantized models only in the dsv4 layout (its names for codes and scales), and never after
    prepare_decode laid their weights out for the CPU's kernels."""
    if any(getattr(m, "prepared", False) is True for m in model.modules()):
        raise ValueError("this model's quantized weights are laid out for the CPU's kernels (prepare_decode); save the "
                         "model as loaded, before it is prepared for the engine")
    quantization = getattr(model, "quantization", None)
    if quantization and layout != "dsv4":
        raise ValueError(f"a quantized model is saved in the dsv4 layout (its names for codes and scales), not "
                         f"{layout!r}")
    return quantization
