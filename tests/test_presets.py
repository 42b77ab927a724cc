"""Every preset builds on `meta` with exactly the parameter count that its configuration implies, counted here from
the architecture's formulas (not from the modules), so a layer gained, lost or misshaped in any preset fails."""

import pytest
import torch

from dsv4 import PRESETS, ModelArgs, Transformer


def expected_params(a: ModelArgs) -> int:
    """Parameters of the V4 architecture described by `a` (main model + MTP modules), from the paper's shapes."""
    D, n = a.dim, a.hc_mult
    H, d, R = a.n_heads, a.head_dim, a.o_lora_rank

    def compressor(width_of: int, overlap: bool, ratio: int) -> int:
        width = (2 if overlap else 1) * width_of
        return 2 * D * width + ratio * width + width_of  # wkv, wgate, ape [m, width], norm [d]

    def attention(ratio: int) -> int:
        p = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * d  # wq_a, q_norm, wq_b
        p += D * d + d + (H * d // a.o_groups) * a.o_groups * R + a.o_groups * R * D + H  # wkv, kv_norm, wo_a/b, sink
        if ratio:
            csa = ratio == a.csa_ratio
            p += compressor(d, csa, ratio)
            if csa:  # lightning indexer: wq_b, weights_proj, its own overlapping compressor
                p += a.q_lora_rank * a.index_n_heads * a.index_head_dim + D * a.index_n_heads
                p += compressor(a.index_head_dim, True, ratio)
        return p

    def block(ratio: int) -> int:
        moe = a.n_routed_experts * D + a.n_routed_experts * 3 * a.moe_inter_dim * D  # router, experts w13 + w2
        moe += 3 * D * a.n_shared_experts * a.moe_inter_dim
        rows = (2 + n) * n
        hyper = 2 * (rows * n * D + rows + 3)  # hc_attn, hc_ffn: fn, base, scale
        return attention(ratio) + moe + hyper + 2 * D  # + attn_norm, ffn_norm

    head = n * n * D + n + 1 + D  # hc_head (fn, base, scale) + final norm
    total = a.vocab_size * D * (1 if a.tie_embeddings else 2) + head
    total += sum(block(r) for r in a.compress_ratios[: a.n_layers])
    mtp = [block(r) + 2 * D + 2 * D * D + head for r in a.compress_ratios[a.n_layers:]]  # enorm/hnorm, e/h_proj
    return total + sum(mtp) + engram(a)


def engram(a: ModelArgs) -> int:
    """Engram's parameters: per layer the table (the prime table sizes x the row width), the key projection to every
    stream and the value projection (with biases), three per-stream norms and the depthwise convolution."""
    if not a.engram:
        return 0
    from dsv4.model.engram import table_sizes

    D, n, E = a.dim, a.hc_mult, a.engram_dim * (a.engram_max_ngram - 1)
    per_row = a.engram_dim // a.engram_heads
    sizes = table_sizes(a.engram_layers, a.engram_max_ngram, a.engram_heads, a.engram_vocab)
    gating = E * n * D + n * D + E * D + D + 3 * n * D + (n * D * a.engram_kernel if a.engram_conv else 0)
    gating -= 0 if a.engram_conv else n * D  # no convolution, no norm before it
    return sum(sum(map(sum, sizes[layer])) * per_row + gating for layer in a.engram_layers)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_the_parameter_count_of_its_configuration(name):
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.device.type == "meta" for p in model.parameters())
    counted = sum(p.numel() for p in dict.fromkeys(model.parameters()))
    assert counted == expected_params(args)


def test_the_formula_sees_a_changed_layer():
    """The count moves with the configuration: one CSA layer turned into a sliding-window one loses exactly its
    compressor and indexer."""
    a = ModelArgs.from_name("tiny")
    b = ModelArgs.from_name("tiny", compress_ratios=[0, 0, 16, 4, 0])
    with torch.device("meta"):
        na, nb = (sum(p.numel() for p in Transformer(x).parameters()) for x in (a, b))
    assert na - nb == expected_params(a) - expected_params(b) > 0


def test_the_small_presets_forward_on_meta():
    for name in ("tiny", "small", "small-lc"):
        args = ModelArgs.from_name(name)
        with torch.device("meta"):
            logits = Transformer(args)(torch.zeros(1, 300, dtype=torch.long))
        assert logits.shape == (1, 300, args.vocab_size) and logits.device.type == "meta"
