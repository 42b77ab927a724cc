"""DeepSeek-V4 mixture of experts: sqrt-softplus router, aux-loss-free selection bias, hash-routed first layers,
clamped SwiGLU routed experts run grouped by expert, plus an always-on shared expert.

    s = score(x W^T)  (fp32; sqrt(softplus(.)) in V4)        selection: topk(s + bias)  or  tid2eid[token] (hash layers)
    w = s_sel / sum(s_sel) * route_scale                      (the bias chooses experts, never weighs them)
    expert(x) = w2( silu(min(w1 x, L)) * clamp(w3 x, -L, L) )     y = sum_k w_k expert_k(x) + shared(x)

In training the layer also reports (into a `dsv4.model.stats.LayerStats`) its expert load [E] and, when asked,
DeepSeek-V3's sequence-wise balance statistic  mean_b sum_i f_i P_i  (see `sequence_balance`).

Shape legend: N tokens, D model dim, I expert width, E routed experts, K experts per token, A = N*K assignments,
B sequences of T tokens (N = B*T).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelArgs
from dsv4.device import grouped_rows_multiple
from dsv4.kernels.fused import Linear, LinearGroup, Products, Weight, dense
from dsv4.kernels.qweight import QuantWeight, quantize
from dsv4.model.stats import LayerStats


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


class Expert(nn.Module):
    """The shared expert: a dense clamped SwiGLU MLP."""

    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)
        self.w13 = LinearGroup(self.w1, self.w3)  # one product once fused (dsv4.kernels.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(*self.w13(x), self.limit))


class Gate(nn.Module):
    ops = Products  # the product set (dsv4.kernels.fused)

    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.hashed, self.topk, self.score_func, self.route_scale = (
            hashed, args.n_activated_experts, args.score_func, args.route_scale)
        self.n_experts = args.n_routed_experts
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        if hashed:  # frozen token -> experts table
            self.register_buffer("tid2eid", torch.empty(args.vocab_size, args.n_activated_experts, dtype=torch.long))
        else:  # aux-loss-free balancing bias: moved by the trainer toward balance, used only to select
            self.register_buffer("bias", torch.empty(args.n_routed_experts, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02, seed: int = 0):
        nn.init.normal_(self.weight, std=std)
        if not self.hashed:
            self.bias.zero_()
        elif self.tid2eid.device.type != "meta":  # K distinct random experts per token id, reproducible
            g = torch.Generator().manual_seed(seed)
            table = torch.rand(self.tid2eid.shape[0], self.n_experts, generator=g).argsort(-1)[:, : self.topk]
            self.tid2eid.copy_(table)

    def forward(self, x_ND: torch.Tensor, ids_N: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weights [N, K] fp32, expert indices [N, K], scores [N, E] fp32)"""
        logits_NE = self.ops.linear(x_ND.float(), self.weight.float())
        if self.score_func == "sqrtsoftplus":
            scores_NE = F.softplus(logits_NE).sqrt()
        elif self.score_func == "sigmoid":
            scores_NE = logits_NE.sigmoid()
        else:
            scores_NE = logits_NE.softmax(-1)
        if self.hashed:
            if ids_N is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            idx_NK = self.tid2eid[ids_N]
        else:
            idx_NK = torch.topk(scores_NE + self.bias, self.topk, dim=-1, sorted=False).indices
        w_NK = scores_NE.gather(1, idx_NK)
        w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return w_NK, idx_NK, scores_NE


class Experts(nn.Module):
    """E routed experts as grouped weights: w13 [E, 2I, D] (w1 rows, then w3 rows) and w2 [E, D, I]. `quantize`
    keeps them quantized in memory instead (buffers w13 / w2 hold the codes, w13_scale / w2_scale the scales)."""
    ops = Products  # the product set (dsv4.kernels.fused)
    hot_paths = ("act",)  # what dsv4.kernels.compile.compile_hot_paths compiles
    fmt: str | None = None  # the quantized format, None while dense
    kernel_layout = False  # int4 codes in the layout of torch's CPU kernel (prepare_kernels)
    prepared = False  # prepare_kernels ran: an inference-time layout, not saved
    ep = None  # a dsv4.model.parallel.ExpertParallel when this rank holds a slice of the experts (training)
    DECODE_ASSIGNMENTS = 4  # per expert, at most: what `decoding` counts as a decode step's

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.limit, self.inter_dim = args.swiglu_limit, args.moe_inter_dim
        self.w13 = nn.Parameter(torch.empty(args.n_routed_experts, 2 * args.moe_inter_dim, args.dim))
        self.w2 = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, args.moe_inter_dim))

    @torch.no_grad()
    def quantize(self, fmt: str, group: int) -> "Experts":
        """Replace w13 and w2 by their quantized codes and scales (dsv4.kernels.qweight; on `meta` the empty buffers
        a quantized checkpoint fills). Inputs and outputs keep the dtype the weights had."""
        self.compute_dtype = self.w13.dtype
        for name in ("w13", "w2"):
            qw = quantize(getattr(self, name).detach(), fmt, group)
            delattr(self, name)
            self.register_buffer(name, qw.codes)
            self.register_buffer(f"{name}_scale", qw.scale)
        self.fmt = fmt
        return self

    def matrix(self, name: str) -> Weight:
        """w13 or w2 as the products take it: the parameter, or a QuantWeight over the codes."""
        if self.fmt is None:
            return getattr(self, name)
        return QuantWeight(self.fmt, getattr(self, name), getattr(self, f"{name}_scale"), kernel=self.kernel_layout)

    @torch.no_grad()
    def prepare_kernels(self) -> None:
        """On the CPU, both matrices as torch's kernels take them (see dsv4.kernels.fused.QuantLinear.prepare_kernels):
        int8's scales in the compute dtype, int4 re-laid for the int4 kernel when both matrices can be."""
        if self.fmt is None or self.prepared:
            return
        if self.fmt == "int8":
            for name in ("w13_scale", "w2_scale"):
                setattr(self, name, getattr(self, name).to(self.compute_dtype))
        laid = [self.matrix(name).to_kernel() for name in ("w13", "w2")]
        if all(qw.kernel for qw in laid):
            for name, qw in zip(("w13", "w2"), laid):
                setattr(self, name, qw.codes)
                setattr(self, f"{name}_scale", qw.scale.to(self.compute_dtype))
            self.kernel_layout = True
        self.prepared = True

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """w13 or w2 as a dense tensor: the parameter itself, or the quantized weight decoded into `dtype`."""
        return getattr(self, name) if self.fmt is None else dense(self.matrix(name), dtype)

    def reset_parameters(self, std: float = 0.02):
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=std)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(self.inter_dim, dim=-1)
        return swiglu(gate, up, self.limit)

    def forward(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        if self.ep is not None:  # experts spread over ranks (dsv4.model.parallel)
            from dsv4.model.parallel import expert_parallel_forward

            return expert_parallel_forward(self, x_ND, w_NK, idx_NK, self.ep)
        E = self.w13.shape[0]
        if 0 < 2 * idx_NK.numel() <= E or (torch.compiler.is_compiling() and self.decoding(idx_NK)):
            # decoding a few tokens: fewer assignments than experts; or a compiled batched decode step, whose fused
            # products read each chosen expert in place (dsv4.kernels.fused; 2.5x faster than grouped GEMMs over
            # experts padded to GROUP_ROWS rows at batch 16 on a 2-core CPU)
            return self.forward_gathered(x_ND, w_NK, idx_NK)
        w13, w2 = self.dense("w13", x_ND.dtype), self.dense("w2", x_ND.dtype)
        if not self.grouped_ok(x_ND, w13):
            return self.forward_dense(x_ND, w_NK, idx_NK)
        N, K = idx_NK.shape
        # sort the N*K assignments by expert, run each expert once on its contiguous slice (grouped GEMM)
        flat = idx_NK.flatten()
        order_A = flat.argsort(stable=True)
        token_A = order_A // K
        # expert counts with a static shape (bincount's length depends on the data)
        counts_E = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        y_AD = self.grouped(x_ND[token_A], flat[order_A], counts_E, w13, w2)
        y_AD = y_AD * w_NK.flatten()[order_A, None].to(y_AD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)

    def grouped(self, x_AD: torch.Tensor, expert_A: torch.Tensor, counts_E: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
        """Rows x_AD sorted by expert (expert_A, counts_E of each of the E experts of w13 [E, 2I, D] and w2) -> each
        row through its expert, unweighted [A, D]: one grouped GEMM per matrix, or the dense twin where the grouped
        GEMM cannot take the shapes."""
        if not self.grouped_ok(x_AD, w13):
            ones = torch.ones(expert_A.shape[0], 1, dtype=torch.float32, device=x_AD.device)
            return self.forward_dense(x_AD, ones, expert_A[:, None], w13, w2)
        # (a decode step's few rows per expert take few distinct shapes: no padding needed to bound their kernels)
        rows = 1 if self.decoding(expert_A) else grouped_rows_multiple(x_AD.device, x_AD.dtype)
        if rows == 1:
            offs_E = counts_E.cumsum(0).to(torch.int32)
            h_A2I = F.grouped_mm(x_AD, w13.transpose(-1, -2), offs=offs_E)
            return F.grouped_mm(self.act(h_A2I), w2.transpose(-1, -2), offs=offs_E)
        pos_A, offs_E, total = padded_groups(expert_A, counts_E, rows)
        x_PD = x_AD.new_zeros(total, x_AD.shape[-1]).index_copy_(0, pos_A, x_AD)
        h_P2I = F.grouped_mm(x_PD, w13.transpose(-1, -2), offs=offs_E)
        return F.grouped_mm(self.act(h_P2I), w2.transpose(-1, -2), offs=offs_E)[pos_A]

    def forward_gathered(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Few assignments (a decode step): run just the chosen experts, each on its token, instead of a grouped GEMM
        that visits every expert (`gathered_linear`: plain, a batched matmul over the gathered weights; a CPU decode
        step's fused product reads them in place, no gathered copy)."""
        N, K = idx_NK.shape
        flat = idx_NK.flatten()
        x_AD = x_ND.repeat_interleave(K, dim=0)
        h_A2I = self.ops.gathered_linear(x_AD, self.matrix("w13")[flat])
        y_AD = self.ops.gathered_linear(self.act(h_A2I), self.matrix("w2")[flat])
        return (y_AD.view(N, K, -1) * w_NK[..., None].to(y_AD.dtype)).sum(1)

    def decoding(self, assignments: torch.Tensor) -> bool:
        """Inference over at most a few assignments per expert (a batched decode step, not a prefill chunk)."""
        return not torch.is_grad_enabled() and assignments.numel() <= self.DECODE_ASSIGNMENTS * self.w13.shape[0]

    def grouped_ok(self, x: torch.Tensor, w13: torch.Tensor | None = None) -> bool:
        """F.grouped_mm needs 16-byte aligned rows and matching dtypes; under torch.compile its meta kernel accepts
        only bf16 (eager CPU takes fp32 too). w13: the dense w13 the product would read (default: this layer's)."""
        w13 = self.dense("w13", x.dtype) if w13 is None else w13
        align = 16 // x.element_size()
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            return False
        if x.device.type == "meta" and x.dtype != torch.bfloat16:  # (its meta kernel: bf16 only, compiled or not)
            return False
        return x.dtype == w13.dtype and x.shape[-1] % align == 0 and self.inter_dim % align == 0

    def forward_dense(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor,
                      w13: torch.Tensor | None = None, w2: torch.Tensor | None = None) -> torch.Tensor:
        """Plain twin of `forward`: every expert on every token, weighted by a dense [N, E] routing matrix.
        Exact and simple; used by tests and for shapes the grouped GEMM cannot take. w13, w2: the expert stacks
        (default: this layer's, all of them)."""
        w13 = self.dense("w13", x_ND.dtype) if w13 is None else w13
        w2 = self.dense("w2", x_ND.dtype) if w2 is None else w2
        dense_NE = torch.zeros(x_ND.shape[0], w13.shape[0], dtype=torch.float32, device=x_ND.device)
        dense_NE.scatter_add_(1, idx_NK, w_NK.float())
        h_NE2I = torch.einsum("nd,efd->nef", x_ND, w13.to(x_ND.dtype))
        y_NED = torch.einsum("nei,edi->ned", self.act(h_NE2I), w2.to(x_ND.dtype))
        return (y_NED * dense_NE.unsqueeze(-1).to(y_NED.dtype)).sum(1)


class MoE(nn.Module):
    """Routed + shared experts. Given a `LayerStats` (training), it reports the layer's expert load and, when asked,
    its sequence-wise balance statistic."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.gate = Gate(args, hashed=layer_id < args.n_hash_layers)
        self.experts = Experts(args)
        self.shared_experts = (Expert(args.dim, args.n_shared_experts * args.moe_inter_dim, args.swiglu_limit)
                               if args.n_shared_experts else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                stats: LayerStats | None = None) -> torch.Tensor:
        """x [B, T, D] (input_ids [B, T] for hash routing) -> [B, T, D]"""
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        w_NK, idx_NK, scores_NE = self.gate(x_ND, None if input_ids is None else input_ids.reshape(-1))
        if stats is not None:
            stats.load = expert_load(idx_NK, scores_NE.shape[-1])
            if stats.balance:
                stats.seq_balance = sequence_balance(idx_NK, scores_NE, shape[0])
        y = self.experts(x_ND, w_NK, idx_NK)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_ND)
        return y.view(shape)


def padded_groups(expert_A: torch.Tensor, counts_E: torch.Tensor, rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each of A expert-sorted assignments goes when every expert's group is rounded up to a multiple of
    `rows` (so that a grouped GEMM sees only a few distinct shapes) -> (row of each assignment [A], the groups' ends
    [E] int32, total rows). The total is static, A + E (rows - 1); the last group takes the slack. The padding rows
    are zeros: they add nothing to the weights' gradients and their outputs are never read."""
    E = counts_E.shape[0]
    total = expert_A.shape[0] + E * (rows - 1)
    padded_E = (counts_E + rows - 1) // rows * rows
    ends_E = padded_E.cumsum(0)
    rank_A = torch.arange(expert_A.shape[0], device=expert_A.device) - (counts_E.cumsum(0) - counts_E)[expert_A]
    pos_A = (ends_E - padded_E)[expert_A] + rank_A
    offs_E = torch.cat([ends_E[:-1], ends_E.new_full((1,), total)]).to(torch.int32)
    return pos_A, offs_E, total


def expert_load(idx_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert [E] fp32 (a static shape under compile, unlike bincount's)."""
    flat = idx_NK.flatten()
    return torch.zeros(n_experts, device=flat.device).scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))


def sequence_balance(idx_NK: torch.Tensor, scores_NE: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance statistic, before its weight alpha (eq. 17-20):  mean_b sum_i f_i P_i,
    f_i = E / (K T) * #tokens of sequence b routed to i,  P_i = mean_t s_i / sum_j s_j. 1 when perfectly balanced
    with uniform scores, E / K at worst. idx [N, K], scores [N, E] fp32, N = batch * T -> scalar fp32."""
    E, K = scores_NE.shape[-1], idx_NK.shape[-1]
    idx_BTK, s_BTE = idx_NK.view(batch, -1, K), scores_NE.view(batch, -1, E)
    T = s_BTE.shape[1]
    hits_BE = torch.zeros(batch, E, device=idx_NK.device).scatter_add_(
        1, idx_BTK.flatten(1), torch.ones(batch, T * K, device=idx_NK.device))
    f_BE = hits_BE * E / (K * T)
    p_BE = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()
