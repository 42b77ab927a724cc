import re, sys, torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from dsv4 import ModelArgs, Transformer

def to_hf_name(k):
    rules = [(r"^embed\.", "model.embed_tokens."), (r"^head\.", "lm_head."), (r"^norm\.", "model.norm."),
             (r"^hc_head\.(fn|base|scale)", r"model.hc_head.hc_\1"), (r"^layers\.", "model.layers.")]
    for a, b in rules: k = re.sub(a, b, k)
    for a, b in [(".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
                 (".hc_attn.", ".attn_hc."), (".hc_ffn.", ".ffn_hc."),
                 (".attn.indexer.compressor.wkv.", ".self_attn.compressor.indexer.kv_proj."),
                 (".attn.indexer.compressor.wgate.", ".self_attn.compressor.indexer.gate_proj."),
                 (".attn.indexer.compressor.ape", ".self_attn.compressor.indexer.position_bias"),
                 (".attn.indexer.compressor.norm.", ".self_attn.compressor.indexer.kv_norm."),
                 (".attn.indexer.wq_b.", ".self_attn.compressor.indexer.q_b_proj."),
                 (".attn.indexer.weights_proj.", ".self_attn.compressor.indexer.scorer.weights_proj."),
                 (".attn.compressor.wkv.", ".self_attn.compressor.kv_proj."), (".attn.compressor.wgate.", ".self_attn.compressor.gate_proj."),
                 (".attn.compressor.ape", ".self_attn.compressor.position_bias"), (".attn.compressor.norm.", ".self_attn.compressor.kv_norm."),
                 (".attn.wq_a.", ".self_attn.q_a_proj."), (".attn.q_norm.", ".self_attn.q_a_norm."), (".attn.wq_b.", ".self_attn.q_b_proj."),
                 (".attn.wkv.", ".self_attn.kv_proj."), (".attn.kv_norm.", ".self_attn.kv_norm."), (".attn.wo_a.", ".self_attn.o_a_proj."),
                 (".attn.wo_b.", ".self_attn.o_b_proj."), (".attn.attn_sink", ".self_attn.sinks"),
                 (".ffn.gate.bias", ".mlp.gate.e_score_correction_bias"), (".ffn.gate.", ".mlp.gate."),
                 (".ffn.experts.w13", ".mlp.experts.gate_up_proj"), (".ffn.experts.w2", ".mlp.experts.down_proj"),
                 (".ffn.shared_experts.w1.", ".mlp.shared_experts.gate_proj."), (".ffn.shared_experts.w3.", ".mlp.shared_experts.up_proj."),
                 (".ffn.shared_experts.w2.", ".mlp.shared_experts.down_proj.")]:
        k = k.replace(a, b)
    return k

def randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"): p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif ".fn" in n or n.endswith("hc_head.fn"): p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif n.endswith(".base"): p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif n.endswith(".scale"): p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "attn_sink" in n: p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith(".ape"): p.copy_(torch.randn(p.shape, generator=g))
            else: p.copy_(torch.randn(p.shape, generator=g) * 0.5 * p.shape[-1] ** -0.5)
        for n, b in m.named_buffers():
            if n.endswith("gate.bias"): b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if n.endswith("tid2eid"): b.copy_(torch.rand(b.shape[0], m.args.n_routed_experts, generator=g).argsort(-1)[:, :b.shape[1]])

def run(over, S, B=2, seed=0):
    a = ModelArgs.from_name("tiny", **over)
    torch.manual_seed(seed)
    m = Transformer(a); m.init_weights(); randomize(m, seed)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**a.to_hf_config())).eval()
    sd = {to_hf_name(k): v for k, v in m.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "inv_freq" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.randint(0, a.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = m(ids)
        theirs = hf(ids, use_cache=False).logits
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()

if __name__ == "__main__":
    for over in [dict(), dict(hc_mult=1), dict(compress_ratios=[0,0,0,0,0]), dict(compress_ratios=[16,16,16,16,0]), dict(compress_ratios=[4,4,4,4,0], n_hash_layers=0)]:
        for S in [1, 7, 33, 129, 300]:
            print(over, S, run(over, S))
