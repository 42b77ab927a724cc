"""What the multimodal model does with each modality (issue 22): validation CE per task and expert load per modality.

Both read rows of every task drawn from a seed that training never uses (`rows_by_task`). Expert load labels each
input token by what it is: `text` (a text-corpus row), `caption` (text inside an image or clip row: captions, motion
words, BOS/EOS), `image` or `video` (codes, frame markers and span tokens of an image or a clip), and counts, per MoE
layer, the routed experts each modality's tokens go to (`dsv4.model.stats.RouteTrace`). The report gives each
modality's share per expert and, per layer, the total variation distance between each modality's distribution and
text's (0: the same experts, 1: disjoint); hash-routed layers route by token id, so differ by construction.
"""

from __future__ import annotations

import torch

from dsv4.data.multimodal import MultimodalMix
from dsv4.model.stats import RouteTrace
from dsv4.tokenizers.multimodal import VisualVocab

MODALITIES = ("text", "caption", "image", "video")
IMAGE_TASKS = ("text->image", "image->caption")


def rows_by_task(mix: MultimodalMix, seed: int, rows_per_task: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{task: (ids [n, seq_len + 1], weights)}: the first `rows_per_task` unpacked rows of each task of `seed`."""
    wanted = [t for t, p in mix.mix.items() if p > 0]
    by_task: dict[str, list] = {}
    k = 0
    while any(len(by_task.get(t, ())) < rows_per_task for t in wanted) and k < 200 * rows_per_task:
        task, ids, w = mix.row(k, seed)
        if len(by_task.setdefault(task, [])) < rows_per_task:
            by_task[task].append((ids, w))
        k += 1
    return {t: (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
            for t, rows in sorted(by_task.items())}


def token_modalities(task: str, ids: torch.Tensor, vocab: VisualVocab, pad_id: int) -> torch.Tensor:
    """Index into MODALITIES of each id [..] of a `task` row (-1: padding)."""
    visual = vocab.is_code(ids) | torch.isin(ids, torch.tensor([vocab.bof, vocab.boi, vocab.eoi, vocab.bov, vocab.eov],
                                                                 device=ids.device))
    if task == "text":
        out = torch.zeros_like(ids)
    else:
        span = MODALITIES.index("image" if task in IMAGE_TASKS else "video")
        out = torch.where(visual, span, MODALITIES.index("caption"))
    return out.masked_fill(ids == pad_id, -1)


@torch.no_grad()
def task_losses(model, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict:
    """Mean weighted CE (nats per counted target) of each task's rows, the weights as training counts them
    (image->video: the generated steps only)."""
    from dsv4.train.loss import cross_entropy

    model.eval()
    out = {}
    for task, (ids, w) in rows.items():
        ids, w = ids.to(device), w.to(device)
        out[task] = round(cross_entropy(model(ids[:, :-1]), ids[:, 1:], w[:, 1:]).item(), 4)
    return out


@torch.no_grad()
def expert_load_by_modality(model, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], vocab: VisualVocab,
                            pad_id: int, device: torch.device) -> dict:
    """{"share": {layer: {modality: [E] share of its tokens' routed assignments per expert}}, "tokens": {modality:
    count}, "tv_from_text": {layer: {modality: total variation distance to text's shares}}}."""
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    tokens = torch.zeros(len(MODALITIES), dtype=torch.long)
    for task, (ids, _) in rows.items():
        x = ids[:, :-1].to(device)
        labels = token_modalities(task, x, vocab, pad_id).flatten()
        tokens += torch.bincount(labels[labels >= 0], minlength=len(MODALITIES)).cpu()
        with RouteTrace(model) as trace:
            model(x)
        for name in (n for n, r in trace.routes.items() if r):  # the main blocks (MTP's do not run here)
            experts = trace.experts(name)  # [N, K]
            E = trace.layers[name].experts.w13.shape[0]
            keep = labels >= 0
            flat = labels[keep, None].expand(-1, experts.shape[1]) * E + experts[keep]
            c = torch.bincount(flat.flatten(), minlength=len(MODALITIES) * E).view(len(MODALITIES), E).cpu()
            counts[name] = counts.get(name, 0) + c
    share = {name: {m: (c[i] / c[i].sum().clamp(min=1)).tolist() for i, m in enumerate(MODALITIES) if tokens[i]}
             for name, c in counts.items()}
    tv = {name: {m: round(0.5 * sum(abs(a - b) for a, b in zip(s[m], s["text"])), 4) for m in s if m != "text"}
          for name, s in share.items() if "text" in s}
    return {"share": {n: {m: [round(v, 5) for v in s] for m, s in d.items()} for n, d in share.items()},
            "tokens": {m: int(tokens[i]) for i, m in enumerate(MODALITIES)}, "tv_from_text": tv}
