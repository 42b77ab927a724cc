"""Checkpoint tensor names: ours, transformers' and DeepSeek's release, and how each maps onto our model.

    dsv4      `layers.{i}.attn.wq_a.weight`, `layers.{i}.hc_attn.fn`, `layers.{i}.ffn.experts.w13`
    hf        `model.layers.{i}.self_attn.q_a_proj.weight`, `...attn_hc.fn`, `...mlp.experts.gate_up_proj`
    upstream  our names except `hc_attn_fn` (hc_ffn_*, hc_head_*) and one tensor per routed expert
              `ffn.experts.{e}.w{1,2,3}.weight`, quantized weights with a `<name>.scale` beside them
`resolve` maps a name in any layout (or a mix, as transformers' own save_pretrained writes) to where it goes in our
model; `to_layout_name` maps ours to a layout for export. dsv4.weights.checkpoint does the IO.
"""

from __future__ import annotations

import dataclasses
import re

LAYOUTS = ("hf", "upstream", "dsv4")

# --- name maps -------------------------------------------------------------------------------------------------------
# leaf names inside `layers.{i}.` / `mtp.{j}.`: ours -> transformers'
_HF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{site}.{p}": f"{site}_hc.{p}" for site in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    **{f"attn.{ours}compressor.{a}": f"self_attn.compressor.{theirs}{b}"
       for ours, theirs in (("", ""), ("indexer.", "indexer."))
       for a, b in (("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"),
                    ("ape", "position_bias"), ("norm.weight", "kv_norm.weight"))},
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.experts.w13": "mlp.experts.gate_up_proj",
    "ffn.experts.w2": "mlp.experts.down_proj",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    # Engram (transformers has none; the same names under `model.layers.{i}.`)
    **{f"engram.{leaf}": f"engram.{leaf}" for leaf in (
        "table.weight", "key.weight", "key.bias", "value.weight", "value.bias", "key_norm.weight",
        "query_norm.weight", "conv_norm.weight", "conv.weight")},
}
# extra leaves of an MTP module (the rest of it is a block)
_HF_MTP = {**{f"{n}.weight": f"{n}.weight" for n in ("enorm", "hnorm", "e_proj", "h_proj", "norm")},
           **{f"hc_head.{p}": f"hc_head.hc_{p}" for p in ("fn", "base", "scale")}}
_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "engram_ids": "model.engram_ids",
           **{f"hc_head.{p}": f"model.hc_head.hc_{p}" for p in ("fn", "base", "scale")}}

_SCOPED = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
# one routed expert's matrix, as the release (w1/w2/w3) or a per-expert HF export (gate/up/down_proj) names it
_EXPERT = re.compile(r"^(?:ffn|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _upstream_leaf(leaf: str) -> str:
    """`hc_attn.fn` -> `hc_attn_fn` (the release spells hyper-connection parameters flat); other leaves unchanged."""
    return leaf.replace(".", "_", 1) if leaf.startswith(("hc_attn.", "hc_ffn.", "hc_head.")) else leaf


def to_layout_name(name: str, layout: str) -> str:
    """Our state_dict name -> its name in `layout` (fused experts keep one name; `export` splits them for upstream)."""
    if layout == "dsv4":
        return name
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    m = _SCOPED.match(name)
    if layout == "upstream":
        return (f"{m[1]}.{m[2]}.{_upstream_leaf(m[3])}" if m else _upstream_leaf(name))
    if not m:
        if name not in _HF_TOP:
            raise ValueError(f"no transformers name for {name!r}")
        return _HF_TOP[name]
    scope, i, leaf = m.groups()
    hf = (_HF_MTP.get(leaf) if scope == "mtp" else None) or _HF_BLOCK.get(leaf)
    if hf is None:
        raise ValueError(f"no transformers name for {name!r}")
    return f"model.layers.{i}.{hf}" if scope == "layers" else f"mtp.{i}.{hf}"


def _aliases(table: dict[str, str]) -> dict[str, str]:
    """every spelling of a leaf (ours, transformers', the release's) -> ours. transformers' `save_pretrained` undoes
    its load-time rename `.norm.` -> `.kv_norm.` everywhere, so `kv_norm` may also come back as `norm`
    (`model.layers.0.self_attn.norm.weight`)."""
    out = {}
    for ours, hf in table.items():
        for name in (ours, hf, _upstream_leaf(ours)):
            out[name] = out[name.replace("kv_norm.", "norm.")] = ours
    return out


_BLOCK_ALIASES = _aliases(_HF_BLOCK)
_MTP_ALIASES = _aliases(_HF_MTP)
_TOP_ALIASES = _aliases({ours: hf.removeprefix("model.") for ours, hf in _HF_TOP.items()})  # `model.` is stripped


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a whole model tensor, or one routed expert's w1 / w3 / w2 slice of it."""
    param: str
    expert: int | None = None
    part: str | None = None  # "w1" | "w3" | "w2"


def resolve(name: str) -> Target | None:
    """A checkpoint tensor name in any layout -> its destination in our model, or None if unknown."""
    n = name.removeprefix("model.")
    m = _SCOPED.match(n)
    if not m:
        return Target(_TOP_ALIASES[n]) if n in _TOP_ALIASES else None
    scope, i, leaf = m.groups()
    prefix = f"{scope}.{i}."
    ours = (_MTP_ALIASES.get(leaf) if scope == "mtp" else None) or _BLOCK_ALIASES.get(leaf)
    if ours is not None:
        return Target(prefix + ours)
    e = _EXPERT.match(leaf)
    if e:
        part = _PART.get(e[2], e[2])
        return Target(prefix + ("ffn.experts.w2" if part == "w2" else "ffn.experts.w13"), int(e[1]), part)
    return None


def detect_layout(names) -> str:
    names = list(names)
    if any(n.startswith("model.") or n == "lm_head.weight" for n in names):
        return "hf"
    if any(n.endswith((".experts.w13", ".hc_attn.fn")) for n in names):
        return "dsv4"
    return "upstream"


def scale_owner(name: str, names: set[str]) -> str | None:
    """If `name` is a quantization scale, the weight it scales: `X.scale` next to `X.weight` (release), or
    `X_scale_inv` (HF FP8). `hc_attn.scale`-style parameters have no `.weight` sibling and stay ordinary tensors."""
    if name.endswith("_scale_inv"):
        return name[: -len("_scale_inv")]
    if name.endswith(".scale") and name[: -len(".scale")] + ".weight" in names:
        return name[: -len(".scale")] + ".weight"
    return None
