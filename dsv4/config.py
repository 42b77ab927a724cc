"""ModelArgs: every hyperparameter that changes the math of a DeepSeek-V4 model, plus the presets.

Field names follow DeepSeek's own inference code (`dim`, `n_layers`, `compress_ratios`, ...), so an upstream
`config.json` reads straight in; `from_hf_config` / `to_hf_config` translate to and from the names used by
`transformers.DeepseekV4Config` (model_type `deepseek_v4`).

Per-layer attention is one list, `compress_ratios`, with one entry per main layer followed by one per MTP layer:
0 = sliding window only, `csa_ratio` = compressed sparse attention (overlapping compressor + lightning indexer),
`hca_ratio` = heavily compressed attention (non-overlapping compressor, no indexer).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")

# transformers' layer-type names for our per-layer ratios
HF_SWA, HF_CSA, HF_HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


@dataclass
class ModelArgs:
    # --- trunk ---
    vocab_size: int = 129280
    dim: int = 4096  # hidden size
    n_layers: int = 43
    norm_eps: float = 1e-6
    max_seq_len: int = 1048576
    tie_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # --- attention: shared-KV MQA with sinks, partial RoPE on the trailing dims, grouped output projection ---
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64  # trailing dims of each head that carry RoPE
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128  # sliding window, self included
    rope_theta: float = 10000.0  # sliding-window-only layers: plain RoPE
    compress_rope_theta: float = 160000.0  # compressed layers: this theta + YaRN
    rope_factor: float = 16.0  # YaRN factor (1 = no YaRN)
    original_seq_len: int = 65536  # YaRN original context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # --- compression (CSA / HCA) ---
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    csa_ratio: int = 4
    hca_ratio: int = 128
    # --- lightning indexer (CSA layers) ---
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # --- MoE ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    score_func: str = "sqrtsoftplus"
    n_hash_layers: int = 3  # the first n layers route by a frozen tid2eid[token] table
    swiglu_limit: float = 10.0
    # --- manifold-constrained hyper-connections ---
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- multi-token prediction ---
    n_mtp_layers: int = 1
    # --- Engram conditional memory (dsv4.model.engram): off while engram_layers is empty ---
    engram_layers: list[int] = field(default_factory=list)  # main layers that read the memory before attention
    engram_max_ngram: int = 3  # n-gram orders 2..N
    engram_heads: int = 8  # hash heads (tables) per order
    engram_vocab: list[int] = field(default_factory=list)  # rows per head for each order (the first prime above)
    engram_dim: int = 512  # width per order: engram_heads rows of engram_dim // engram_heads
    engram_seed: int = 0
    engram_conv: bool = True  # the paper's causal depthwise short convolution (V4.1 ships without it)
    engram_kernel: int = 4
    engram_pad_id: int = 2  # the token id that stands before a sequence's start (compressed like any other)
    engram_compressed_vocab: int = 0  # ids after tokenizer compression (0: not compressed, vocab_size)

    def __post_init__(self):
        self.compress_ratios = list(self.compress_ratios)
        self.engram_layers, self.engram_vocab = list(self.engram_layers), list(self.engram_vocab)
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                    "window_size", "index_n_heads", "index_head_dim", "n_routed_experts", "n_activated_experts",
                    "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "csa_ratio", "hca_ratio", "max_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ["n_shared_experts", "n_hash_layers", "n_mtp_layers", "rope_head_dim", "index_topk"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelArgs.{name} must be a non-negative integer, got {value!r}")
        for name in ["norm_eps", "rope_theta", "compress_rope_theta", "route_scale", "swiglu_limit", "hc_eps",
                     "beta_fast", "beta_slow"]:
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelArgs.{name} must be > 0, got {getattr(self, name)!r}")
        if self.rope_factor < 1:
            raise ValueError(f"ModelArgs.rope_factor must be >= 1 (1 disables YaRN), got {self.rope_factor}")
        if self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            raise ValueError(f"ModelArgs.rope_head_dim must be even and <= head_dim ({self.head_dim}), "
                             f"got {self.rope_head_dim}")
        if self.rope_head_dim > self.index_head_dim:
            raise ValueError(f"ModelArgs.index_head_dim ({self.index_head_dim}) must be >= rope_head_dim "
                             f"({self.rope_head_dim}): indexer queries and keys carry the same RoPE")
        if (self.n_heads * self.head_dim) % self.o_groups or self.n_heads % self.o_groups:
            raise ValueError(f"ModelArgs.o_groups ({self.o_groups}) must divide n_heads ({self.n_heads})")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"ModelArgs.n_activated_experts ({self.n_activated_experts}) must be <= "
                             f"n_routed_experts ({self.n_routed_experts})")
        if self.n_hash_layers > self.n_layers:
            raise ValueError(f"ModelArgs.n_hash_layers ({self.n_hash_layers}) must be <= n_layers ({self.n_layers})")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"ModelArgs.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.csa_ratio == self.hca_ratio:
            raise ValueError(f"ModelArgs.csa_ratio and hca_ratio must differ, both are {self.csa_ratio}")
        expected = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != expected:
            raise ValueError(f"ModelArgs.compress_ratios needs n_layers + n_mtp_layers = {expected} entries, "
                             f"got {len(self.compress_ratios)}")
        allowed = {0, self.csa_ratio, self.hca_ratio}
        bad = sorted({r for r in self.compress_ratios if r not in allowed})
        if bad:
            raise ValueError(f"ModelArgs.compress_ratios entries must be in {sorted(allowed)} "
                             f"(0, csa_ratio, hca_ratio), got {bad}")
        if self.engram_layers:
            self._check_engram()

    def _check_engram(self):
        layers = self.engram_layers
        if sorted(set(layers)) != layers or not all(0 <= i < self.n_layers for i in layers):
            raise ValueError(f"ModelArgs.engram_layers must be distinct main layers in increasing order, in "
                             f"[0, {self.n_layers}), got {layers}")
        for name in ("engram_heads", "engram_dim", "engram_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.engram_max_ngram < 2:
            raise ValueError(f"ModelArgs.engram_max_ngram must be >= 2 (bigrams), got {self.engram_max_ngram}")
        if len(self.engram_vocab) != self.engram_max_ngram - 1 or min(self.engram_vocab) < 2:
            raise ValueError(f"ModelArgs.engram_vocab needs one table size >= 2 per order 2..{self.engram_max_ngram},"
                             f" got {self.engram_vocab}")
        if self.engram_dim % self.engram_heads:
            raise ValueError(f"ModelArgs.engram_dim ({self.engram_dim}) must be a multiple of engram_heads "
                             f"({self.engram_heads})")
        if not 0 <= self.engram_pad_id < self.vocab_size:
            raise ValueError(f"ModelArgs.engram_pad_id must be a token id, got {self.engram_pad_id}")
        if not 0 <= self.engram_compressed_vocab <= self.vocab_size:
            raise ValueError(f"ModelArgs.engram_compressed_vocab must be in [0, vocab_size], "
                             f"got {self.engram_compressed_vocab}")

    # --- derived ---
    @property
    def engram(self) -> bool:
        return bool(self.engram_layers)

    @property
    def compressed_vocab(self) -> int:
        """Size of Engram's compressed vocabulary (the whole vocabulary when the ids are not compressed)."""
        return self.engram_compressed_vocab or self.vocab_size

    def with_engram(self, **options) -> ModelArgs:
        """These args with Engram on: its settings so far (a preset's), or defaults that fit the model
        (`engram_defaults`), then `options` (the engram_* fields without the prefix; None keeps the setting)."""
        base = {k: getattr(self, f"engram_{k}") for k in ENGRAM_KEYS} if self.engram else engram_defaults(self)
        chosen = {**base, **{k: v for k, v in options.items() if v is not None}}
        vocab = chosen["vocab"]
        if isinstance(vocab, int) or len(vocab) == 1:  # one size for every order
            chosen["vocab"] = [vocab if isinstance(vocab, int) else vocab[0]] * (chosen["max_ngram"] - 1)
        return ModelArgs.from_dict({**self.to_dict(), **{f"engram_{k}": v for k, v in chosen.items()}})

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def layer_kind(self, layer_id: int) -> str:
        """'swa', 'csa' or 'hca' for main layer `layer_id` (MTP layers follow at n_layers + j)."""
        ratio = self.compress_ratios[layer_id]
        return "swa" if ratio == 0 else "csa" if ratio == self.csa_ratio else "hca"

    # --- (de)serialisation ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    # --- transformers' DeepseekV4Config <-> ModelArgs ---
    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> ModelArgs:
        """Read a transformers `config.json` (dict, file, or checkpoint directory)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        return cls.from_dict(_hf_to_args(config))

    def to_hf_config(self) -> dict:
        """A config.json dict that `transformers.DeepseekV4Config` reads with the same meaning."""
        kind = {0: HF_SWA, self.csa_ratio: HF_CSA, self.hca_ratio: HF_HCA}
        partial = self.rope_head_dim / self.head_dim
        compress_rope = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                         "partial_rotary_factor": partial}
        if self.rope_factor > 1:
            compress_rope.update(rope_type="yarn", factor=self.rope_factor,
                                 original_max_position_embeddings=self.original_seq_len,
                                 beta_fast=self.beta_fast, beta_slow=self.beta_slow, attention_factor=1.0)
        if self.n_shared_experts != 1:
            raise ValueError(f"transformers' DeepseekV4 has exactly one shared expert; "
                             f"n_shared_experts={self.n_shared_experts} cannot be expressed")
        return {
            "model_type": "deepseek_v4",
            "architectures": ["DeepseekV4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "partial_rotary_factor": partial,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window_size,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_parameters": {
                "main": {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": partial},
                "compress": compress_rope,
            },
            "layer_types": [kind[r] for r in self.compress_ratios[: self.n_layers]],
            "compress_rates": {HF_CSA: self.csa_ratio, HF_HCA: self.hca_ratio},
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "moe_intermediate_size": self.moe_inter_dim,
            "routed_scaling_factor": self.route_scale,
            "scoring_func": self.score_func,
            "norm_topk_prob": True,
            "mlp_layer_types": ["hash_moe" if i < self.n_hash_layers else "moe" for i in range(self.n_layers)],
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "num_nextn_predict_layers": self.n_mtp_layers,
            # our extra: the MTP layers' attention kind, which transformers does not model
            "mtp_compress_ratios": self.compress_ratios[self.n_layers:],
            # our extra: Engram (transformers has none; it keeps the key as a plain attribute)
            **({"engram": {k: getattr(self, f"engram_{k}") for k in ENGRAM_KEYS}} if self.engram else {}),
        }


# transformers keys we read, and keys that carry no meaning for the math (accepted and ignored)
def engram_defaults(args: ModelArgs) -> dict:
    """Engram settings that fit any preset (`tiny` included): the second layer (and one a third of the way down in
    deep models, as V4.1 reads it at layers 1 and 14 of 43), orders 2 and 3, rows per head 5x the vocabulary (the
    demo's ratio), half the model width per order, the paper's short convolution."""
    n = args.n_layers
    layers = sorted({min(1, n - 1)} | ({n // 3} if n >= 6 else set()))
    heads = 8 if args.dim >= 512 else 4
    dim = max(heads * 8, args.dim // 2 // heads * heads)
    return dict(layers=layers, max_ngram=3, heads=heads, vocab=5 * args.vocab_size, dim=dim, seed=0, conv=True,
                kernel=4, pad_id=2 if args.vocab_size > 2 else 0)


ENGRAM_KEYS = ("layers", "max_ngram", "heads", "vocab", "dim", "seed", "conv", "kernel", "pad_id", "compressed_vocab")

_HF_IGNORED = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "pad_token_id",
    "initializer_range", "attention_bias", "attention_dropout", "mlp_bias", "hidden_act", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "quantization_config", "auto_map", "num_key_value_heads",
    "norm_topk_prob", "expert_dtype", "_name_or_path", "id2label", "label2id", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "problem_type", "output_hidden_states", "output_attentions",
}


def _hf_to_args(c: dict) -> dict:
    """transformers' config dict -> our ModelArgs fields: checks, plain renames, then RoPE, layer kinds, hash layers."""
    c = dict(c)
    _hf_check(c)
    simple = {
        "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers", "rms_norm_eps": "norm_eps",
        "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings",
        "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "num_attention_heads": "n_heads",
        "head_dim": "head_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
        "sliding_window": "window_size", "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
        "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
        "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
        "num_experts_per_tok": "n_activated_experts", "moe_intermediate_size": "moe_inter_dim",
        "routed_scaling_factor": "route_scale", "scoring_func": "score_func", "swiglu_limit": "swiglu_limit",
        "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
        "num_nextn_predict_layers": "n_mtp_layers",
    }
    structural = {"layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor",
                  "mtp_compress_ratios", "qk_rope_head_dim", "compress_ratios", "num_hash_layers",
                  "compress_rate_csa", "compress_rate_hca", "rope_scaling", "topk_method", "engram"}
    unknown = sorted(k for k in c if k not in simple and k not in structural and k not in _HF_IGNORED)
    if unknown:
        raise ValueError(f"config.json has field(s) dsv4 does not understand: {', '.join(unknown)}")
    d = {ours: c[theirs] for theirs, ours in simple.items() if theirs in c}
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    n = d.get("n_layers", ModelArgs.n_layers)

    _hf_rope(c, d)
    _hf_layer_kinds(c, d, n)
    _hf_hash_layers(c, d, n)
    engram = c.get("engram") or {}
    unknown = sorted(set(engram) - set(ENGRAM_KEYS))
    if unknown:
        raise ValueError(f"config.json's engram has field(s) dsv4 does not understand: {', '.join(unknown)}")
    d.update({f"engram_{k}": v for k, v in engram.items()})
    return d


def _hf_check(c: dict) -> None:
    """Refuse configs whose math V4 does not have (not one shared K=V head, another activation or routing)."""
    if c.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ValueError(f"config.json model_type is {c['model_type']!r}, expected 'deepseek_v4'")
    if c.get("num_key_value_heads", 1) != 1:
        raise ValueError(f"config.json num_key_value_heads must be 1 (V4 shares one K=V head), "
                         f"got {c['num_key_value_heads']}")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act must be 'silu', got {c['hidden_act']!r}")
    if c.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"config.json topk_method must be 'noaux_tc' (bias-corrected top-k), got {c['topk_method']!r}")
    if c.get("norm_topk_prob", True) is not True:
        raise ValueError("config.json norm_topk_prob must be true for DeepSeek-V4")


def _hf_rope(c: dict, d: dict) -> None:
    """RoPE fields: the partial factor -> rope_head_dim; YaRN parameters from the "compress" sub-dict (or flat)."""
    head_dim = d.get("head_dim", ModelArgs.head_dim)
    partial = c.get("partial_rotary_factor")
    if c.get("qk_rope_head_dim") is not None:
        d["rope_head_dim"] = int(c["qk_rope_head_dim"])
    elif partial is not None:
        d["rope_head_dim"] = int(head_dim * partial)
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}  # rope_scaling: the release's legacy name
    main, compress = rp.get("main"), rp.get("compress")
    if not isinstance(compress, dict):
        compress = {k: v for k, v in rp.items() if k not in ("main", "compress")}
    if isinstance(main, dict) and "rope_theta" in main:
        d["rope_theta"] = main["rope_theta"]
    if "rope_theta" in compress and isinstance(rp.get("compress"), dict):
        d["compress_rope_theta"] = compress["rope_theta"]
    if compress.get("rope_type", compress.get("type", "default")) == "yarn":
        if compress.get("attention_factor", 1.0) != 1.0 or compress.get("mscale") or compress.get("mscale_all_dim"):
            raise ValueError("config.json rope_parameters: DeepSeek-V4 YaRN uses no attention scaling "
                             "(attention_factor 1.0, no mscale)")
        d["rope_factor"] = float(compress["factor"])
        d["original_seq_len"] = int(compress["original_max_position_embeddings"])
        d["beta_fast"] = float(compress.get("beta_fast") or 32)
        d["beta_slow"] = float(compress.get("beta_slow") or 1)
    else:
        d["rope_factor"] = 1.0


def _hf_layer_kinds(c: dict, d: dict, n: int) -> None:
    """Per-layer attention kinds (layer_types, compress_ratios or transformers' default schedule) -> compress_ratios."""
    rates = dict(c.get("compress_rates") or {})
    if "compress_rate_csa" in c:
        rates[HF_CSA] = c["compress_rate_csa"]
    if "compress_rate_hca" in c:
        rates[HF_HCA] = c["compress_rate_hca"]
    d["csa_ratio"] = int(rates.get(HF_CSA, 4))
    d["hca_ratio"] = int(rates.get(HF_HCA, 128))
    n_mtp = d.get("n_mtp_layers", ModelArgs.n_mtp_layers)
    if c.get("layer_types") is not None:
        ratio = {HF_SWA: 0, HF_CSA: d["csa_ratio"], HF_HCA: d["hca_ratio"]}
        bad = sorted({t for t in c["layer_types"] if t not in ratio})
        if bad:
            raise ValueError(f"config.json layer_types has unknown entries {bad}; allowed: {sorted(ratio)}")
        if len(c["layer_types"]) != n:
            raise ValueError(f"config.json layer_types has {len(c['layer_types'])} entries for "
                             f"num_hidden_layers={n}")
        main_ratios = [ratio[t] for t in c["layer_types"]]
    elif c.get("compress_ratios") is not None:
        main_ratios = list(c["compress_ratios"][:n])
    else:  # transformers' default schedule: 2x HCA, then alternating CSA / HCA
        main_ratios = [d["hca_ratio"]] * min(n, 2) + [d["csa_ratio"] if i % 2 else d["hca_ratio"]
                                                      for i in range(max(n - 2, 0))]
    mtp_ratios = c.get("mtp_compress_ratios")
    if mtp_ratios is None and c.get("compress_ratios") is not None and len(c["compress_ratios"]) > n:
        mtp_ratios = list(c["compress_ratios"][n:])
    if mtp_ratios is None:
        mtp_ratios = [0] * n_mtp  # the released MTP layers are sliding-window only
    d["compress_ratios"] = main_ratios + list(mtp_ratios)


def _hf_hash_layers(c: dict, d: dict, n: int) -> None:
    """The hash-routed MoE layers, which must be a prefix of the stack."""
    if c.get("mlp_layer_types") is not None:
        types = list(c["mlp_layer_types"])
        bad = sorted({t for t in types if t not in ("hash_moe", "moe")})
        if bad:
            raise ValueError(f"config.json mlp_layer_types has unknown entries {bad}; allowed: hash_moe, moe")
        n_hash = sum(t == "hash_moe" for t in types)
        if types[:n_hash] != ["hash_moe"] * n_hash:
            raise ValueError("config.json mlp_layer_types: hash_moe layers must come first")
        d["n_hash_layers"] = n_hash
    elif c.get("num_hash_layers") is not None:
        d["n_hash_layers"] = int(c["num_hash_layers"])
    else:
        d["n_hash_layers"] = min(n, 3)


# --- presets: plain dicts of overrides on the defaults (the defaults are V4-Flash) ---
PRESETS: dict[str, dict] = {
    # unit tests: every layer kind, forward well under a second on a CPU
    "tiny": dict(
        vocab_size=512, dim=64, n_layers=4, max_seq_len=65536, n_heads=4, head_dim=32, rope_head_dim=16,
        q_lora_rank=32, o_groups=2, o_lora_rank=32, window_size=16, original_seq_len=4096,
        compress_ratios=[0, 4, 16, 4, 0], csa_ratio=4, hca_ratio=16,
        index_n_heads=16, index_head_dim=32, index_topk=8,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=64, n_hash_layers=1, hc_mult=4,
    ),
    # trains on a 2-core CPU (~130M total parameters, ~30M active)
    "small": dict(
        vocab_size=8192, dim=512, n_layers=8, max_seq_len=1048576, n_heads=8, head_dim=64, rope_head_dim=32,
        q_lora_rank=256, o_groups=4, o_lora_rank=256, window_size=128, original_seq_len=8192,
        compress_ratios=[0, 4, 128, 4, 128, 4, 128, 4, 0], csa_ratio=4, hca_ratio=128,
        index_n_heads=8, index_head_dim=64, index_topk=64,
        n_routed_experts=16, n_activated_experts=2, moe_inter_dim=512, n_hash_layers=1, hc_mult=4,
    ),
    # the released DeepSeek-V4-Flash (284B total, 13B active)
    "v4-flash": dict(),
    # the released DeepSeek-V4-Pro (1.6T total, 49B active)
    "v4-pro": dict(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
        compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0], index_topk=1024,
        n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
    ),
    # a ~1T-total member of the family, as the announcement describes: V4-Pro's trunk with 240 routed experts
    # (992.7B total, 48.8B active)
    "v4-1t": dict(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
        compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0], index_topk=1024,
        n_routed_experts=240, moe_inter_dim=3072, route_scale=2.5,
    ),
}
# the first `make run` model (bench/scaling.py's best 5-minute point: 3.3M total, 1.6M active parameters, a 4096-token
# vocabulary, 4 blocks); kept to reproduce the results measured with it
PRESETS["v4-3m"] = {
    **PRESETS["small"], "vocab_size": 4096, "dim": 128, "n_layers": 4, "n_heads": 2, "head_dim": 64,
    "rope_head_dim": 32, "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64, "compress_ratios": [0, 4, 128, 4, 0],
    "index_n_heads": 4, "index_head_dim": 64, "index_topk": 32, "n_routed_experts": 8, "moe_inter_dim": 128,
}
# the V4 architecture whole (mHC, an SWA, a CSA with the indexer and an HCA block, a hash-routed then routed + shared
# experts, MTP) at the size and vocabulary that learned most in 10 minutes on a 2-core CPU (bench/budget_runs.py:
# 2.2M total, 1.0M active parameters, a 2048-token vocabulary); `make run` trained it until v4-2m-engram
PRESETS["v4-2m"] = {**PRESETS["v4-3m"], "vocab_size": 2048, "n_layers": 3, "compress_ratios": [0, 4, 128, 0]}
# what `make run` trains: `v4-2m` with Engram at layer 1 (orders 2 and 3, 4 heads each of 16-wide rows, 170,888 rows
# per head: tables of 21.9M parameters, 10x the backbone; the short convolution), its experts narrowed from 128 to
# 104 so that its active parameters equal v4-2m's (1.04M): in 10 minutes it ends 0.10 bpb below v4-2m
# (bench/results/engram_iso_10m.json); the compressed vocabulary is filled in from the tokenizer when it trains
PRESETS["v4-2m-engram"] = {
    **PRESETS["v4-2m"], "moe_inter_dim": 104, "engram_layers": [1], "engram_max_ngram": 3, "engram_heads": 4,
    "engram_vocab": [170888, 170888], "engram_dim": 64, "engram_seed": 0, "engram_conv": True, "engram_kernel": 4,
    "engram_pad_id": 2,
}
# long-context retrieval on a 2-core CPU (~15M parameters): small's trunk at half the width and depth, with wide heads
# (a compressed entry is one 128-wide vector for 4-8 tokens) and a 64-token window, so a needle is reached through
# CSA's top-32 entries (or HCA) from a few hundred tokens on
PRESETS["small-lc"] = {
    **PRESETS["small"], "dim": 256, "n_layers": 4, "n_heads": 4, "head_dim": 128, "q_lora_rank": 128, "o_groups": 2,
    "o_lora_rank": 128, "window_size": 64, "compress_ratios": [0, 4, 128, 4, 0], "index_n_heads": 4,
    "index_topk": 32, "n_routed_experts": 8, "moe_inter_dim": 256,
}
