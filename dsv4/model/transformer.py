"""The DeepSeek-V4 transformer: embedding -> hc_mult residual streams -> blocks -> hc_head -> norm -> head.

    h = embed(ids) copied into n streams                       [B, S, n, D]
    block:  (Engram layers: h = h + engram(h, rows of the n-grams ending at each position))
            x, post, comb = hc_attn(h);  h = post * attn(attn_norm(x)) + comb^T h
            x, post, comb = hc_ffn(h);   h = post * moe(ffn_norm(x))   + comb^T h
    logits = head(norm(hc_head(h)))
    MTP j:  h' = block(e_proj(enorm(embed(t_{i+1+j}))) + h_proj(hnorm(h_i)))  -> its own hc_head + norm -> shared head

The model is pure and single-device: `forward` reads whole sequences (and, handed a `dsv4.model.stats.TrainStats`,
reports what training needs: expert loads, balance statistics, indexer KLs); `step` continues sequences from a
`dsv4.model.cache.KVCache` it is handed (the engine owns the cache, the scheduling and the sampling); fast paths
(dsv4.kernels: compiled blocks, fused products), sharding and quantization act on it from outside.
References: DeepSeek-V4 release; `transformers.DeepseekV4ForCausalLM` is the numerical reference.
"""

import torch
from torch import nn

from dsv4.config import ModelArgs
from dsv4.kernels.fused import Linear
from dsv4.model.attention import Attention
from dsv4.model.cache import KVCache, LayerCache, Step
from dsv4.model.engram import Engram, EngramHash, engram_hashes
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.moe import Gate, MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import Rotary
from dsv4.model.stats import LayerStats, TrainStats

# parameters the release keeps in fp32 whatever the compute dtype (hyper-connections, norms, sinks, gate bias)
FP32_SUFFIXES = (".fn", ".base", ".scale", "attn_sink", ".ape", "norm.weight", "gate.bias", "engram.table.weight")


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, hashing: EngramHash | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.engram = Engram(args, layer_id, hashing) if hashing is not None else None
        self.kind = args.layer_kind(layer_id)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args, layer_id)
        hc = (args.dim, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps)
        self.hc_attn = HyperConnection(*hc)
        self.hc_ffn = HyperConnection(*hc)

    def forward(self, h: torch.Tensor, ids: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerCache | None = None, step: Step | None = None,
                stats: LayerStats | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Streams h [B, S, n, D] fp32 -> new streams: whole sequences (rope = this kind's (cos, sin); training passes
        `stats` for the block to report into), or with `cache` and `step` one incremental step. memory: the Engram
        rows [B, S, H'] this layer reads (Engram layers only)."""
        dtype = self.attn.wq_a.dtype  # the sub-layers' compute dtype; the streams h stay fp32
        if self.engram is not None:
            h = self.read_memory(h, memory, cache, step)
        x, post, comb = self.hc_attn(h)
        a = self.attn_norm(x).to(dtype)
        a = self.attn(a, rope, stats) if cache is None else self.attn.step(a, cache, step)
        h = self.hc_attn.post(a, h, post, comb)
        x, post, comb = self.hc_ffn(h)
        return self.hc_ffn.post(self.ffn(self.ffn_norm(x).to(dtype), ids, stats), h, post, comb)

    def read_memory(self, h: torch.Tensor, rows: torch.Tensor, cache: LayerCache | None, step: Step | None):
        """h + Engram's output; in a step, its short convolution continues from (and commits to) the cache."""
        if cache is None or cache.conv is None:
            return self.engram(h, rows)[0]
        h, x = self.engram(h, rows, step.read_past(cache.conv, 0.0))
        step.write_ring(cache.conv, x)
        return h


class MTPBlock(Block):
    """One multi-token-prediction module: a full block fed with the next token's embedding and the main streams."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.e_proj = Linear(args.dim, args.dim, bias=False)
        self.h_proj = Linear(args.dim, args.dim, bias=False)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.hc_head = HyperHead(args.dim, args.hc_mult, args.hc_eps, args.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: LayerCache | None = None, step: Step | None = None,
                stats: LayerStats | None = None) -> torch.Tensor:
        """h [B, S, n, D] streams at position i, emb [B, S, D] embedding of token i+1 -> new streams."""
        dtype = self.e_proj.dtype
        x = self.e_proj(self.enorm(emb).to(dtype)).unsqueeze(2) + self.h_proj(self.hnorm(h).to(dtype))
        return super().forward(x.float(), None, rope, cache, step, stats)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        hashes = engram_hashes(args)
        self.layers = nn.ModuleList(Block(args, i, hashes.get(i)) for i in range(args.n_layers))
        if args.engram:  # token id -> Engram's compressed id (from the tokenizer: `set_engram_vocab`)
            self.register_buffer("engram_ids", torch.arange(args.vocab_size))
        self.hc_head = HyperHead(args.dim, args.hc_mult, args.hc_eps, args.norm_eps)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPBlock(args, args.n_layers + j) for j in range(args.n_mtp_layers))
        self.rope_swa = Rotary(args, args.rope_theta, yarn=False)
        self.rope_compress = Rotary(args, args.compress_rope_theta, yarn=True)

    # --- initialisation and dtype ---
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0):
        """Fresh weights for training from scratch (call after `to_empty` when built on meta)."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Gate):
                module.reset_parameters(std, seed=seed + stable_hash(name))
            elif module is not self and type(module).__module__.startswith("dsv4.") \
                    and hasattr(module, "reset_parameters"):
                module.reset_parameters(std)
        if self.args.engram:  # a stand-in until the tokenizer's compression is set
            self.engram_ids.copy_(torch.arange(self.args.vocab_size).clamp(max=self.args.compressed_vocab - 1))

    @torch.no_grad()
    def set_engram_vocab(self, lookup) -> None:
        """Engram's compressed id of every token id ([vocab_size] ints: dsv4.model.engram.compress_vocab)."""
        lookup = torch.as_tensor(lookup, dtype=torch.long)
        if lookup.shape != (self.args.vocab_size,) or int(lookup.min()) < 0 \
                or int(lookup.max()) + 1 != self.args.compressed_vocab:
            raise ValueError(f"an Engram compression must map each of the {self.args.vocab_size} token ids into "
                             f"[0, {self.args.compressed_vocab}), using the last; got {tuple(lookup.shape)} ids in "
                             f"[{int(lookup.min())}, {int(lookup.max())}]")
        self.engram_ids.copy_(lookup)

    @torch.no_grad()
    def init_rope(self):
        """Recompute the non-persistent RoPE tables (needed after `to_empty`)."""
        self.rope_swa.reset_parameters()
        self.rope_compress.reset_parameters()

    def to_dtype(self, dtype: torch.dtype) -> "Transformer":
        """Cast floating parameters to `dtype`, keeping the release's fp32 ones (hyper-connections, norms, ...)."""
        for name, p in self.named_parameters():
            if p.is_floating_point() and not name.endswith(FP32_SUFFIXES):
                p.data = p.data.to(dtype)
        return self

    # --- forward ---
    def rope(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.rope_swa if kind == "swa" else self.rope_compress)(positions)

    def check_ids(self, input_ids: torch.Tensor):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.numel() and input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.args.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.args.vocab_size}); got ids in [{lo}, {hi}]")
        if input_ids.shape[1] > self.args.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {self.args.max_seq_len}")

    def forward_streams(self, input_ids: torch.Tensor, stats: TrainStats | None = None) -> tuple[torch.Tensor, dict]:
        """-> (final residual streams [B, S, n, D] before hc_head, rope tables by layer kind)."""
        self.check_ids(input_ids)
        S = input_ids.shape[1]
        positions = torch.arange(S, device=input_ids.device)
        ropes = {kind: self.rope(kind, positions) for kind in ("swa", "csa")}
        ropes["hca"] = ropes["csa"]
        # fp32 streams; materialised, since batched matmuls over a stride-0 stream dim fall back to per-token copies
        h = self.embed(input_ids).float().unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        memory = self.engram_rows(input_ids)
        for layer in self.layers:
            h = layer(h, input_ids, ropes[layer.kind], stats=None if stats is None else stats.layer(layer.layer_id),
                      memory=memory.get(layer.layer_id))
        # (a placed model, dsv4.weights.placement: the streams come home from the last layer's device; else a no-op)
        return h.to(input_ids.device), ropes

    def engram_rows(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                    step: Step | None = None) -> dict[int, torch.Tensor]:
        """{Engram layer: rows [B, S, H'] of its table} from the token ids alone (before any block runs). In a step
        the n-grams reach back into the previous positions kept in the cache, and this step's ids are committed."""
        if not self.args.engram:
            return {}
        ids = self.engram_ids[input_ids]
        pad = self.engram_ids[self.args.engram_pad_id]
        past = None if cache is None else step.read_past(cache.engram_ids, pad)
        rows = {layer.layer_id: layer.engram.hashing.rows(ids, pad, past) for layer in self.layers
                if layer.engram is not None}
        if cache is not None:
            step.write_ring(cache.engram_ids, ids)
        return rows

    def hidden(self, h: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        """Streams [B, S, n, D] -> the head's input [B, S, D] (collapsed, normalised, in the head's dtype)."""
        x = (norm or self.norm)((hc_head or self.hc_head)(h))
        return x.to(self.head.dtype)

    def logits(self, h: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None):
        return self.head(self.hidden(h, hc_head, norm))

    def forward(self, input_ids: torch.Tensor, mtp: bool = False, hidden: bool = False,
                stats: TrainStats | None = None):
        """input_ids [B, S] -> logits [B, S, V] (in the head's dtype). With mtp=True also a list, one per MTP module j,
        of logits [B, S-1-j, V] where row i predicts token i+2+j from the streams at i and token i+1+j.
        hidden=True returns the head's inputs [B, S, D] in place of logits (for a loss fused with the head).
        stats: training's statistics, filled in per block (see dsv4.model.stats); None for the plain forward."""
        h, ropes = self.forward_streams(input_ids, stats)
        out = self.hidden if hidden else self.logits
        main = out(h)
        if not mtp:
            return main
        outs = []
        for j, block in enumerate(self.mtp):
            n = input_ids.shape[1] - 1 - j
            if n <= 0:
                outs.append(main.new_zeros(input_ids.shape[0], 0, main.shape[-1]))
                continue
            h = block(h[:, :n], self.embed(input_ids[:, 1 + j: 1 + j + n]), ropes[block.kind],
                      stats=None if stats is None else stats.layer(block.layer_id))
            outs.append(out(h, block.hc_head, block.norm))
        return main, outs

    # --- incremental inference ---
    STEP_BUCKET = 256
    def make_step(self, cache: KVCache, slots: torch.Tensor, start: torch.Tensor, width: int,
                  length: torch.Tensor | None = None) -> Step:
        """Describe one step: rows = cache `slots` [B], continuing at positions `start` [B] with `width` input
        columns of which the first `length` [B] (default all) are committed."""
        start = start.long()
        if length is None:
            length = torch.full_like(start, width)
        end = int(start.max()) + width if start.numel() else width
        if end > cache.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache's max_len {cache.max_len}")
        # queries read the compressed entries of positions < end, rounded up to whole buckets: entries past a
        # query's own are masked anyway, and a few shapes (not one per token) keep a compiled step from recompiling
        end = min(-(-end // self.STEP_BUCKET) * self.STEP_BUCKET, cache.max_len)
        rotary = {"swa": self.rope_swa, "csa": self.rope_compress, "hca": self.rope_compress}
        return Step(slots.long(), start, length.long(), width, end, cache.trash, rotary)

    def step(self, input_ids: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """input_ids [B, width] at `step`'s positions -> final streams [B, width, n, D] (before hc_head); reads and
        commits `cache`. Chunked prefill and decoding are both steps; `logits(h)` gives the next-token logits."""
        self.check_ids(input_ids)
        return self.step_unchecked(input_ids, cache, step)

    def step_unchecked(self, input_ids: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """`step` without the input checks (they read the ids on the host): what a compiled decode step runs."""
        h = self.embed(input_ids).float().unsqueeze(2).expand(-1, -1, self.args.hc_mult, -1).contiguous()
        memory = self.engram_rows(input_ids, cache, step)
        for layer, layer_cache in zip(self.layers, cache.main):
            h = layer(h, input_ids, None, layer_cache, step, memory=memory.get(layer.layer_id))
        return h.to(input_ids.device)  # (a placed model: home from the last layer's device; else a no-op)

    def mtp_step(self, h: torch.Tensor, next_ids: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """The first MTP module over a step: main streams h [B, width, n, D] at the step's positions and the tokens
        that follow them [B, width] -> the module's streams (its logits predict the token after `next_ids`)."""
        block = self.mtp[0]
        return block(h, self.embed(next_ids), None, cache.mtp[0], step)


def stable_hash(name: str) -> int:
    """A stable per-module seed (Python's hash() is salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2 ** 31)
