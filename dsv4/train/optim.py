"""Optimizers for training dsv4: Muon for hidden matrices, AdamW for the rest, LR schedules, gradient clipping.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/; used for DeepSeek-V4's hidden matrices):
    B_t = mu * B_{t-1} + G_t                     momentum buffer
    U_t = G_t + mu * B_t                         Nesterov look-ahead
    O_t = NS5(U_t) ~= U V^T   (U_t = U S V^T)    orthogonalised update, the polar factor's direction
    W_t = W_{t-1} * (1 - lr * wd) - lr * 0.2 * sqrt(max(out, in)) * O_t
NS5 is a quintic Newton–Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, with (a, b, c) = (3.4445, -4.7750,
2.0315): it does not converge to U V^T exactly but pushes every singular value into roughly [0.7, 1.2] in 5 steps,
which is all the update needs. The 0.2 * sqrt(max(out, in)) factor is Moonlight's (arXiv:2502.16982, sec. 2.2): an
orthogonal [out, in] matrix has RMS 1/sqrt(max(out, in)), so the update's RMS becomes ~0.2, the RMS AdamW updates
typically have, and Muon can share AdamW's learning rate and weight decay. Grouped expert weights [E, out, in] are
orthogonalised per expert matrix (batched over leading dims).

Everything that is not a hidden matrix (embeddings, output head, router, norms, hyper-connection params, attention
sinks, compressor ape) goes to torch.optim.AdamW; Engram's tables (embeddings with sparse gradients) go to
`RowAdam`, torch.optim.SparseAdam's lazy Adam: it updates only the rows a step read, and their moments only there
(untouched rows and their state stay bit for bit as they were); `Optimizer` holds all three behind one
zero_grad/step/state_dict.
"""
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dsv4.device import has_fused_adamw
from dsv4.train.distributed import local, shard_of, splits_matrices

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# leaf names of parameters trained without weight decay (AdamW): biases, sinks, compressor ape, mHC params
_NO_DECAY_LEAVES = ("bias", "attn_sink", "ape", "fn", "base", "scale")
# modules whose weight stays on AdamW (with decay) although it has >= 2 dims: the output head, the router and
# Engram's depthwise convolution (a [channels, 1, kernel] stack of filters, not a matrix)
_ADAMW_MODULES = ("head", "gate", "conv")


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor U V^T of G [..., m, n], batched over leading dims; returns G's dtype.
    dtype=bfloat16 is the fast GPU path of the original; fp32 is the exact-ish default used on CPU and in tests."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide side so A = X X^T is the smaller Gram matrix
        X = X.mT
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).contiguous()  # spectral <= Frobenius <= 1: NS's basin
    flat = X.reshape(-1, *X.shape[-2:])  # one batched matmul per product; baddbmm fuses the scaled sums
    for _ in range(steps):
        A = torch.bmm(flat, flat.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)             # b A + c A^2
        flat = torch.baddbmm(flat, B, flat, beta=a, alpha=1.0)  # a X + B X
    X = flat.view(X.shape)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def polar_reference(G: torch.Tensor) -> torch.Tensor:
    """Plain twin of newton_schulz: the exact polar factor U V^T from an SVD (fp64)."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)


def muon_scale(shape: torch.Size) -> float:
    """Moonlight's update scale for an [..., out, in] matrix: makes the orthogonal update's RMS ~0.2, like AdamW's."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def _closure_loss(closure) -> torch.Tensor | None:
    """An optimizer step's optional closure (re-evaluates the loss), run with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices and [E, out, in] stacks (each expert matrix orthogonalised on its own). Matrices of one
    shape go through Newton-Schulz together, one batched product per iteration for all of them."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon needs matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # same-shaped matrices orthogonalise in one batched call; a parameter sharded across ranks (a DTensor,
            # dsv4.train.distributed) is updated through its local shard, and one whose shards cut its matrices is
            # gathered whole for Newton-Schulz first (stacks sharded by expert keep whole matrices locally)
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = local(p.grad).float()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, dtype=torch.float32)
                buf = local(state["momentum_buffer"])
                buf.mul_(mu).add_(g)
                u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                if splits_matrices(p):
                    u = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
                by_shape.setdefault((tuple(u.shape), p.shape), []).append((p, u))
            for (_, shape), pairs in by_shape.items():
                params = [p for p, _ in pairs]
                ortho = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_steps"], group["ns_dtype"])
                updates = [shard_of(o, p) if splits_matrices(p) else o for p, o in zip(params, ortho.unbind(0))]
                params = [local(p) for p in params]
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay, as AdamW
                torch._foreach_add_(params, [o.to(p.dtype) for p, o in zip(params, updates)],
                                    alpha=-lr * muon_scale(shape))
        return loss


class RowAdam(torch.optim.SparseAdam):
    """torch.optim.SparseAdam's lazy Adam (the rows a step read, and only their moments, move), its arithmetic in the
    same order (tests/test_optim.py: equal bit for bit), with the rows read and written by index instead of through
    sparse tensors (`sparse_mask`, a sparse `add_` per update): 2.6x faster on the `make run` model's 22M-parameter
    table (6 against 16 ms a step). The state (`step`, `exp_avg`, `exp_avg_sq`) is SparseAdam's, so snapshots of
    either load in the other."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            (beta1, beta2), eps, lr = group["betas"], group["eps"], float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdam takes sparse gradients only (an nn.Embedding with sparse=True)")
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                grad = coalesced(p.grad)  # the update is not linear: one entry per row
                rows, g = grad._indices()[0], grad._values()
                if g.numel() == 0:
                    continue
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                old_avg, old_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
                avg = g.sub(old_avg).mul_(1 - beta1).add_(old_avg)  # old + (1 - b) (new - old)
                sq = g.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
                exp_avg.index_copy_(0, rows, avg)
                exp_avg_sq.index_copy_(0, rows, sq)
                step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = avg.div_(sq.sqrt_().add_(eps)).mul_(-step_size)
                p.index_copy_(0, rows, p.index_select(0, rows).add_(update))
        return loss


def param_kind(name: str, p: nn.Parameter, module: nn.Module | None = None) -> str:
    """'muon' (hidden matrices and expert stacks), 'decay' (AdamW with weight decay), 'no_decay' (AdamW) or 'sparse'
    (an embedding with sparse gradients: RowAdam). `module` is the parameter's owner; embeddings (nn.Embedding or
    a module named embed) and norms get no decay."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    if isinstance(module, nn.Embedding) and module.sparse:
        return "sparse"
    if (p.dim() < 2 or parts[-1] in _NO_DECAY_LEAVES or owner == "embed" or "norm" in owner
            or isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm))):
        return "no_decay"
    if owner in _ADAMW_MODULES:
        return "decay"
    return "muon"


def param_groups(model: nn.Module, lr: float, weight_decay: float, muon_lr: float | None = None,
                 use_muon: bool = True, master=None, memory_lr: float | None = None) -> dict[str, list[dict]]:
    """Split the model's trainable parameters: {'adamw': [decay group, no_decay group], 'muon': [group],
    'sparse': [group]}.
    Each group records its `kind` and `base_lr` (what set_lr scales). With use_muon=False muon matrices join 'decay'.
    memory_lr: the sparse group's (Engram's tables) peak lr; None = lr.
    `master(p)`, if given, is the tensor the optimizer updates for parameter p (its fp32 master copy in mixed
    precision, see dsv4.train.MixedPrecision)."""
    kinds: dict[str, list] = {"muon": [], "decay": [], "no_decay": [], "sparse": []}
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # tied weights are optimised once
                continue
            seen.add(id(p))
            kind = param_kind(f"{mname}.{pname}" if mname else pname, p, module)
            kinds["decay" if kind == "muon" and not use_muon else kind].append(p if master is None else master(p))
    muon_lr = lr if muon_lr is None else muon_lr

    def group(kind, glr, wd):
        return dict(params=kinds[kind], lr=glr, base_lr=glr, weight_decay=wd, kind=kind)
    return {"adamw": [group("decay", lr, weight_decay), group("no_decay", lr, 0.0)],
            "muon": [group("muon", muon_lr, weight_decay)] if use_muon else [],
            "sparse": [group("sparse", lr if memory_lr is None else memory_lr, 0.0)]}


class Optimizer:
    """AdamW (+ Muon, + RowAdam) behind one object: zero_grad, step, state_dict/load_state_dict, param_groups."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon | None = None,
                 sparse: RowAdam | None = None):
        self.adamw, self.muon, self.sparse = adamw, muon, sparse

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.adamw, self.muon, self.sparse) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        sd = {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict() if self.muon is not None else None}
        if self.sparse is not None:
            sd["sparse"] = self.sparse.state_dict()
        return sd

    def load_state_dict(self, sd: dict):
        self.adamw.load_state_dict(sd["adamw"])
        if self.muon is not None:
            self.muon.load_state_dict(sd["muon"])
        if self.sparse is not None:
            self.sparse.load_state_dict(sd["sparse"])


def build_optimizer(model: nn.Module, name: str = "muon", lr: float = 3e-4, weight_decay: float = 0.1,
                    muon_lr: float | None = None, memory_lr: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                    ns_dtype: torch.dtype = torch.float32, master=None) -> Optimizer:
    """name='muon': Muon on hidden matrices + AdamW on the rest; name='adamw': AdamW on everything.
    `master`: see `param_groups`."""
    if name not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}")
    groups = param_groups(model, lr, weight_decay, muon_lr, use_muon=name == "muon", master=master,
                          memory_lr=memory_lr)
    adamw_groups = [g for g in groups["adamw"] if g["params"]]
    # the fused kernel is several times faster than the per-tensor loop (one pass over params, grads and moments)
    fused = all(has_fused_adamw(p.device) for g in adamw_groups for p in g["params"])
    adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    muon_groups = [g for g in groups["muon"] if g["params"]]
    muon = Muon(muon_groups, lr=lr, momentum=momentum, ns_dtype=ns_dtype) if muon_groups else None
    sparse_groups = [g for g in groups["sparse"] if g["params"]]
    sparse = RowAdam(sparse_groups, lr=lr, betas=betas, eps=eps) if sparse_groups else None
    return Optimizer(adamw, muon, sparse)


# ---- learning-rate schedules: pure functions of the step, returning a multiplier of the peak lr ----

def cosine_schedule(step: int, warmup: int, total: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup from ~0 to 1 over `warmup` steps, then cosine down to min_lr_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


WSD_DECAY_FRAC = 0.2  # the share of the steps over which warmup-stable-decay decays


def wsd_decay_start(total: int, decay_frac: float = WSD_DECAY_FRAC) -> int:
    """The step from which warmup-stable-decay's lr falls (that step itself still at the peak)."""
    return total - int(decay_frac * total)


def wsd_schedule(step: int, warmup: int, total: int, decay_frac: float = WSD_DECAY_FRAC,
                 min_lr_ratio: float = 0.0) -> float:
    """Warmup-stable-decay (arXiv:2404.06395): linear warmup, flat at 1, linear decay to min_lr_ratio over the last
    decay_frac of training."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = wsd_decay_start(total, decay_frac)
    if step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * t


def set_lr(optimizer, step: int, warmup: int, total: int, schedule: str = "cosine", min_lr_ratio: float = 0.1,
           decay_frac: float = WSD_DECAY_FRAC) -> float:
    """Set every group's lr to base_lr * schedule(step); returns the multiplier (decay_frac: wsd's only)."""
    if schedule == "wsd":
        mult = wsd_schedule(step, warmup, total, decay_frac, min_lr_ratio)
    elif schedule == "cosine":
        mult = cosine_schedule(step, warmup, total, min_lr_ratio)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: cosine | wsd")
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * mult
    return mult


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient with one entry per row: itself when its rows are already sorted and distinct (Engram's
    lookup makes it so, but autograd's accumulation drops the flag that says it), else `coalesce()` (a sort)."""
    if not grad.is_coalesced() and grad.sparse_dim() == 1:
        rows = grad._indices()[0]
        if bool((rows[1:] > rows[:-1]).all()):
            return grad._coalesced_(True)
    return grad.coalesce()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global grad norm to max_norm (skips params without grads); returns the pre-clip norm. Sparse
    gradients (Engram's tables) are coalesced first: a row read at several positions counts once, summed. Sharded
    gradients (DTensors, dsv4.train.distributed) count every shard once: the squares of the local shards are summed
    over the ranks, plain gradients (the same on every rank) are added once."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    for p in params:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
    grads = [local(p.grad.values() if p.grad.is_sparse else p.grad) for p in params]
    if any(isinstance(p.grad, DTensor) for p in params):
        sharded = [g.float().pow(2).sum() for p, g in zip(params, grads) if isinstance(p.grad, DTensor)]
        plain = [g.float().pow(2).sum() for p, g in zip(params, grads) if not isinstance(p.grad, DTensor)]
        total = torch.stack(sharded).sum()
        torch.distributed.all_reduce(total)
        norm = (total + (torch.stack(plain).sum() if plain else 0.0)).sqrt()
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm.item()
