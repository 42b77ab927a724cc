"""Sampling: filters against a plain per-row reference, penalties by definition, seeds, the drawn distribution."""

import pytest
import torch

from dsv4.engine.sampling import SamplingParams, apply_penalties, filter_logits, sample


def _reference_keep(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens a row keeps, one token at a time from the best down."""
    probs = logits.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = [], 0.0
    for rank, i in enumerate(order):
        if rank > 0 and ((p.top_k and rank >= p.top_k) or mass >= p.top_p or probs[i] < p.min_p * probs[order[0]]):
            continue
        keep.append(i)
        mass += probs[i]
    return set(keep)


def test_filters_match_the_per_row_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        B, V = 4, 12
        logits = torch.randn(B, V, generator=g, dtype=torch.float64) * (0.5 + trial % 5)
        params = [SamplingParams(top_k=int(torch.randint(0, V + 2, (1,), generator=g)),
                                 top_p=float(torch.rand(1, generator=g)) * 0.99 + 0.01,
                                 min_p=float(torch.rand(1, generator=g)) * (trial % 2) * 0.5) for _ in range(B)]
        out = filter_logits(logits, params)
        for row, p in enumerate(params):
            kept = set(torch.isfinite(out[row]).nonzero()[:, 0].tolist())
            assert kept == _reference_keep(logits[row], p), (trial, row, p)
            assert torch.equal(out[row][list(kept)], logits[row][list(kept)])


def test_penalties_by_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[1, 2, 0, 0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    want = torch.tensor([[2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 0.5 - 0.5, 0.5, 3.0]])
    torch.testing.assert_close(apply_penalties(logits, counts, [p]), want)


def test_greedy_rows_and_seeded_rows_are_independent_of_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=5), SamplingParams(top_k=1)]

    def run(rows):
        gens = [params[r].generator() for r in rows]
        return sample(logits[rows], [params[r] for r in rows], gens).tolist()
    together = [run([0, 1, 2]) for _ in range(2)]
    assert together[0] == together[1]
    assert together[0][0] == logits[0].argmax() and together[0][2] == logits[2].argmax()
    assert [run([r])[0] for r in range(3)] == together[0]


def test_drawn_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -3.0]]).repeat(4000, 1)
    p = SamplingParams(temperature=0.7, top_p=0.9)
    want = filter_logits(logits[:1] / 0.7, [p]).softmax(-1)[0]
    gens = [torch.Generator().manual_seed(i) for i in range(len(logits))]
    got = torch.bincount(sample(logits, [p] * len(logits), gens), minlength=5).double() / len(logits)
    assert got[want == 0].sum() == 0
    assert (got - want).abs().max() < 0.03, (got, want)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_k", -2), ("min_p", 1.5),
                                         ("repetition_penalty", 0), ("presence_penalty", 3)])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_top_k_beyond_the_vocabulary_keeps_every_token():
    """(an API client may send any integer: 10**30 must not overflow, it filters nothing)"""
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    out = filter_logits(logits, [SamplingParams(top_k=10 ** 30), SamplingParams(top_k=12)])
    assert torch.equal(out, logits)
