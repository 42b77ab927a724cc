"""What training a configuration costs on N accelerators with dsv4's layout (dsv4.train.distributed), computed from
the config alone: `dsv4 plan --train`. docs/scaling.md explains each term; the numbers are per GPU.

Layout: FSDP2 over all N ranks for everything; with expert parallelism E, rank r holds E_total/E of each layer's routed
experts and FSDP2 shards them further over the N/E ranks that hold the same ones. One micro-batch of `seqs` sequences
of `seq_len` tokens per rank per optimizer step.

    P = all parameters (MTP included); P_exp = routed experts; P_dense = P - P_exp
    masters       4 P / N                 fp32, sharded (the FSDP2 parameters themselves)
    gradients     4 P / N                 fp32, reduced and sharded
    optimizer     (8 P_adamw + 4 P_muon) / N      AdamW: two moments; Muon: one momentum
    gathered      2 (2 U_dense + 2 U_exp / E) + 2 P_root      bf16 working copies: the unit in use and the one being
                                          prefetched (U = the largest block's dense / routed parameters), and the root
                                          (embedding, head), kept gathered from the forward to the backward
    grad buffers  4 (U_dense + U_exp / E)   one unit's unsharded fp32 gradients before their reduce-scatter
    activations   tokens x sum(a_block)                  without activation checkpointing
                  tokens x (a_stream x layers + max a_block)   with it (each block keeps only its input streams)
                  a_block: what one block keeps per token, measured on `meta` (`block_activations`);
                  a_stream = hc_mult x dim x 4 (its fp32 input streams)
Communication per optimizer step and GPU (bytes sent or received, ring collectives):
    FSDP dense    (2 + 2 [+ 2 with checkpointing: the recompute gathers again]) P_dense (N-1)/N + 4 P_dense (N-1)/N
    FSDP experts  the same over P_exp / E and N/E ranks
    all-to-all    2 (dispatch + combine) x passes x tokens x K x D x 2 bytes x (E-1)/E per MoE layer; passes = 2
                  (forward, backward), 3 with checkpointing
`recommend` picks, for each N, the expert-parallel degree (a divisor of N and of the experts) and whether to
checkpoint that fit the memory with the least communication; when none fits, the smallest N that would.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

from dsv4.config import ModelArgs
from dsv4.model.moe import Experts
from dsv4.model.stats import TrainStats
from dsv4.model.transformer import Block, Transformer
from dsv4.train.optim import param_kind

GB = 1e9
STATE = ("masters", "gradients", "optimizer")  # what scales with P / N


@dataclass
class Params:
    """Parameter counts of one configuration, as the layout and the optimizer see them."""
    total: int
    experts: int            # routed experts, every layer
    adamw: int              # parameters AdamW updates (two moments)
    muon: int               # parameters Muon updates (one momentum)
    unit_dense: int         # the largest block's parameters other than its routed experts (one FSDP unit)
    unit_experts: int       # one block's routed experts
    root: int               # embedding and head (and what else the root unit holds)

    @classmethod
    def of(cls, args: ModelArgs) -> Params:
        from dsv4.weights.info import meta_model

        model = meta_model(args)
        adamw = muon = experts = 0
        seen = set()
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                kind = param_kind(f"{mname}.{pname}" if mname else pname, p, module)
                muon += p.numel() if kind == "muon" else 0
                adamw += p.numel() if kind != "muon" else 0
                experts += p.numel() if isinstance(module, Experts) else 0
        blocks = [*model.layers, *model.mtp]
        per_block = [(sum(p.numel() for p in b.parameters()), sum(p.numel() for p in b.ffn.experts.parameters()))
                     for b in blocks]
        in_blocks = sum(n for n, _ in per_block)
        return cls(total=adamw + muon, experts=experts, adamw=adamw, muon=muon,
                   unit_dense=max(n - e for n, e in per_block), unit_experts=max(e for _, e in per_block),
                   root=adamw + muon - in_blocks)


def block_activations(args: ModelArgs, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> list[float]:
    """Bytes per token each block (the main layers, then the MTP layers) keeps for its backward in a training
    forward of one seq_len sequence, as this implementation keeps them: one block of each kind (sliding window,
    CSA, HCA; hash-routed or learned; with or without Engram) runs on the `meta` device inside a saved-tensors hook
    that adds up every tensor autograd saves, parameters excluded (views counted once, by their base). An MTP block
    counts without its input projections."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_dtype(dtype)
    skip = {id(t) for t in (*model.parameters(), *model.buffers())}
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    positions = torch.arange(seq_len, device="meta")
    ropes = {kind: model.rope(kind, positions) for kind in ("swa", "csa")}
    ropes["hca"] = ropes["csa"]
    memory = model.engram_rows(ids)  # {Engram layer: its rows}
    measured: dict[tuple, float] = {}
    sizes = []
    for i in range(args.n_layers + args.n_mtp_layers):
        kind = args.layer_kind(i)
        key = (kind, i < args.n_hash_layers, i in memory)
        if key not in measured:
            block = model.layers[i] if i < args.n_layers else model.mtp[i - args.n_layers]
            measured[key] = saved_bytes(block, args, ids, ropes[kind], memory.get(i), skip) / seq_len
        sizes.append(measured[key])
    return sizes


def saved_bytes(block, args: ModelArgs, ids: torch.Tensor, rope, memory, skip: set[int]) -> int:
    """Bytes autograd saves in one forward of `block` (on meta) over the sequence `ids` [1, S]."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in skip and id(base) not in skip:
            saved.setdefault(id(base), base)
        return t

    h = torch.zeros(1, ids.shape[1], args.hc_mult, args.dim, device="meta", requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # (an MTP block runs as the block it is)
        Block.forward(block, h, ids, rope, stats=TrainStats(indexer="sparse").layer(block.layer_id), memory=memory)
    return sum(t.nbytes for t in saved.values())


@dataclass
class TrainLayout:
    """One layout's memory and traffic per GPU, in bytes."""
    gpus: int
    expert_parallel: int
    checkpointing: bool
    seqs: int
    seq_len: int
    memory: dict[str, float] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)
    budget: float = 0.0

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def total_comm(self) -> float:
        return sum(self.comm.values())

    @property
    def fits(self) -> bool:
        return self.total_memory <= self.budget

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_memory": self.total_memory, "total_comm": self.total_comm,
                "fits": self.fits}


def layout(args: ModelArgs, p: Params, a_block: list[float], gpus: int, ep: int, checkpointing: bool,
           seqs: int = 1, seq_len: int = 4096, gpu_memory: float = 80 * GB, headroom: float = 0.1) -> TrainLayout:
    """Memory and communication per GPU of one layout (the module's docstring has the formulas); a_block: bytes
    per token each block keeps for the backward (`block_activations` at seq_len)."""
    n = gpus
    tokens = seqs * seq_len
    a_stream = args.hc_mult * args.dim * 4
    activations = tokens * (a_stream * len(a_block) + max(a_block) if checkpointing else sum(a_block))
    dense = p.total - p.experts
    memory = {"masters": 4 * p.total / n, "gradients": 4 * p.total / n, "optimizer": (8 * p.adamw + 4 * p.muon) / n,
              "gathered": 2 * (2 * p.unit_dense + 2 * p.unit_experts / ep) + 2 * p.root,
              "grad_buffers": 4 * (p.unit_dense + p.unit_experts / ep), "activations": activations}
    gathers = 3 if checkpointing else 2
    edp = n // ep

    def fsdp(params: float, ranks: int) -> float:
        return (2 * gathers + 4) * params * (ranks - 1) / ranks

    passes = 3 if checkpointing else 2
    comm = {"fsdp_dense": fsdp(dense, n), "fsdp_experts": fsdp(p.experts / ep, edp),
            "all_to_all": 2 * passes * tokens * args.n_activated_experts * args.dim * 2 * (ep - 1) / ep * len(a_block)}
    return TrainLayout(gpus, ep, checkpointing, seqs, seq_len, memory, comm, gpu_memory * (1 - headroom))


def candidates(args: ModelArgs, gpus: int) -> list[int]:
    """Expert-parallel degrees a layout can take: divisors of the GPU count that divide the routed experts."""
    return [e for e in range(1, gpus + 1) if gpus % e == 0 and args.n_routed_experts % e == 0]


def recommend(args: ModelArgs, gpus: int, seqs: int = 1, seq_len: int = 4096, gpu_memory: float = 80 * GB,
              headroom: float = 0.1, params: Params | None = None, a_block: list[float] | None = None) -> dict:
    """The layout for `gpus` GPUs: of those that fit, the least traffic (checkpointing only when needed); else the
    one with the least memory and the smallest GPU count (a multiple of 8) at which some layout fits."""
    p = params or Params.of(args)
    a_block = block_activations(args, seq_len) if a_block is None else a_block
    opts = [layout(args, p, a_block, gpus, ep, ac, seqs, seq_len, gpu_memory, headroom)
            for ac in (False, True) for ep in candidates(args, gpus)]
    fitting = [o for o in opts if o.fits]
    if fitting:
        best = min(fitting, key=lambda o: (o.checkpointing, o.total_comm))
        return {"gpus": gpus, "fits": True, "layout": best.to_dict()}
    best = min(opts, key=lambda o: o.total_memory)
    need = gpus
    while need < 1 << 20:
        need += 8
        if any(layout(args, p, a_block, need, ep, True, seqs, seq_len, gpu_memory, headroom).fits
               for ep in candidates(args, need)):
            break
    return {"gpus": gpus, "fits": False, "layout": best.to_dict(), "gpus_needed": need}


def train_plan(args: ModelArgs, name: str, gpus: list[int], seqs: int = 1, seq_len: int = 4096,
               gpu_memory: float = 80 * GB, headroom: float = 0.1) -> dict:
    """`dsv4 plan --train`: the parameter split and the recommended layout for each GPU count."""
    p, a_block = Params.of(args), block_activations(args, seq_len)
    return {"model": name, "params": dataclasses.asdict(p), "gpu_memory": gpu_memory, "seqs_per_gpu": seqs,
            "seq_len": seq_len,
            "plans": [recommend(args, n, seqs, seq_len, gpu_memory, headroom, p, a_block) for n in gpus]}


def format_train_plan(plan: dict) -> str:
    """The plan as a table: one column per GPU count."""
    p = plan["params"]
    lines = [f"training {plan['model']}: {p['total'] / 1e9:.1f}B parameters ({p['experts'] / 1e9:.1f}B routed experts,"
             f" {p['muon'] / 1e9:.1f}B on Muon, {p['adamw'] / 1e9:.2f}B on AdamW), {plan['seqs_per_gpu']} x "
             f"{plan['seq_len']} tokens per GPU per step, {plan['gpu_memory'] / GB:.0f} GB per GPU"]
    for entry in plan["plans"]:
        lay = entry["layout"]
        head = (f"{entry['gpus']} GPUs: expert parallel {lay['expert_parallel']}, activation checkpointing "
                f"{'on' if lay['checkpointing'] else 'off'}")
        if not entry["fits"]:
            head += (f" -- DOES NOT FIT: {lay['total_memory'] / GB:.0f} GB per GPU against {lay['budget'] / GB:.0f} "
                     f"usable; fits from {entry['gpus_needed']} GPUs")
        lines.append(head)
        mem = ", ".join(f"{k} {v / GB:.1f}" for k, v in lay["memory"].items())
        lines.append(f"  memory per GPU {lay['total_memory'] / GB:.1f} GB ({mem})")
        comm = ", ".join(f"{k} {v / GB:.1f}" for k, v in lay["comm"].items())
        lines.append(f"  traffic per step per GPU {lay['total_comm'] / GB:.1f} GB ({comm})")
        if not entry["fits"]:
            state = sum(lay["memory"][k] for k in STATE)
            lines.append(f"  (the sharded state -- masters, gradients, optimizer -- is {state / GB:.0f} GB of it per "
                         f"GPU: kept in host memory instead, a node of 8 would need {8 * state / 1e12:.1f} TB)")
    return "\n".join(lines)


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=1)
