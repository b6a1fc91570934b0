"""Headroom: how much could any decision-point steering gain on this model and task, before a head is trained?

For every problem the base model gets wrong (greedy), branch its completion at its first few decision points (base
entropy above tau): replace the base choice by each other top-k candidate in turn, continue greedily, and grade.
The share of failures that one such switch fixes is the ceiling of steering at decision points; an oracle head that
picks the best candidate at the first decision point only gets the `oracle_accuracy`.

Two controls get exactly as many tries per failure, so the report separates what decision points are worth from the
luck of more tries:

- `random`: the same switches (the same candidate ranks) at random steps below tau;
- `resample`: whole completions sampled from the prompt (temperature and top-p of the settings), no switch.

If `decision` fixes clearly more failures than both controls, the decision points carry the choices that matter
and a head has something to learn; if `resample` fixes as many, more tries explain the ceiling. (Related: the
"critical tokens" of Lin et al., ICML 2025.)

Outputs, under the run's folder: `base/` (a rollouts folder: the greedy completions, graded), `branches.jsonl` with
`headroom.settings.json` (one record per branch; resumable), `headroom.json` (the [`HeadroomReport`]) and, with
matplotlib installed, `headroom.png`.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_json
from steer.functional import entropy_topk
from steer.pipeline.branching import Branch, BranchDecoding, branch_batches, continue_branches
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.distributed import Workers
from steer.pipeline.folders import RunFolder
from steer.pipeline.folders.rollouts import RolloutFolder, rollout_length
from steer.pipeline.jobs import Job, run_job
from steer.pipeline.problems import Problem
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import teacher_force, token_batches
from steer.settings import HeadroomSettings

REPORT_FILE = "headroom.json"
PLOT_FILE = "headroom.png"
ARMS = ("decision", "random", "resample")


class BranchFolder(RunFolder):
    """The headroom run's folder: `branches.jsonl` (one record per [`Branch`] tried) and its settings."""

    records_file = "branches.jsonl"
    settings_file = "headroom.settings.json"
    key = ("problem_id", "arm", "point", "rank")
    writer = "steer analyze headroom"


@dataclass(frozen=True)
class ArmHeadroom:
    """One arm: its `tries` over all failures, the failures that at least one try fixed, and the share of tries
    that succeeded."""

    tries: int
    fixed: int
    fixed_share: float
    try_success: float


@dataclass(frozen=True)
class CriticalStep:
    """A decision-point switch that fixed a failure: where it sits (the step's entropy, and its percentile among all
    positions of the base completions) and the base rank of the token that fixed it."""

    problem_id: str
    position: int
    entropy: float
    entropy_percentile: float
    rank: int


@dataclass(frozen=True)
class HeadroomReport:
    """What [`headroom`] measured (see the module docstring).

    Attributes:
        model (`str`), problems (`int`), base_accuracy (`float`), failures (`int`), tau (`float`).
        branched (`int`): failures with at least one decision point (the others have nothing to switch).
        tries_per_failure (`float`): mean tries per branched failure, the same in every arm.
        arms (`dict[str, ArmHeadroom]`): `decision`, `random`, `resample`.
        ceiling_accuracy (`float`): accuracy if every failure a decision-point switch fixes were fixed.
        oracle_accuracy (`float`): accuracy of an oracle choosing the best candidate at the first decision point.
        critical (`list[CriticalStep]`): the fixing switches; rank_counts (`dict[str, int]`): their ranks.
        median_entropy_percentile (`float | None`): of the fixing switches' steps.
    """

    model: str
    problems: int
    base_accuracy: float
    failures: int
    tau: float
    branched: int
    tries_per_failure: float
    arms: dict[str, ArmHeadroom]
    ceiling_accuracy: float
    oracle_accuracy: float
    critical: list[CriticalStep]
    rank_counts: dict[str, int]
    median_entropy_percentile: float | None


@dataclass(frozen=True)
class _Scored:
    """Per position of a base completion: entropy `[T]` and the base top-k ids `[T, k]`."""

    entropy: torch.Tensor
    topk: torch.Tensor


def score_completions(model: PreTrainedModel, rollouts: Sequence[dict], top_k: int) -> list[_Scored]:
    """Teacher-force `model` over each rollout record; per completion position its entropy and top-k ids."""
    order = sorted(range(len(rollouts)), key=lambda i: rollout_length(rollouts[i]))
    scored: list[_Scored | None] = [None] * len(rollouts)
    for batch in token_batches([rollouts[i] for i in order], 4096):
        group = [rollouts[order[i]] for i in batch]
        for index, (logits, _) in zip(batch, teacher_force(model, group)):
            stats = entropy_topk(logits, min(top_k, logits.shape[-1]))
            scored[order[index]] = _Scored(stats.entropy.cpu(), stats.indices.cpu())
    return scored


def plan_branches(problem: Problem, record: dict, scored: _Scored, tau: float, settings: HeadroomSettings,
                  rng: random.Random) -> list[Branch]:
    """The tries on one failed completion: `decision` switches at its first `points` gated steps, as many `random`
    switches (the same ranks) at steps below tau, and as many `resample` tries."""
    completion = record["completion_ids"]
    gated = (scored.entropy > tau).nonzero().squeeze(-1).tolist()[: settings.points]
    calm = [t for t in range(len(completion)) if scored.entropy[t] <= tau]
    chosen = {"decision": gated, "random": sorted(rng.sample(calm, min(len(gated), len(calm))))}
    branches = []
    for arm, positions in chosen.items():
        for point, t in enumerate(positions):
            for rank in range(2, min(settings.top_k, scored.topk.shape[1]) + 1):
                key = {"problem_id": problem.id, "arm": arm, "point": point, "rank": rank}
                info = {"position": t, "entropy": float(scored.entropy[t])}
                branches.append(Branch(key, record["prompt_ids"], completion[:t] + [int(scored.topk[t, rank - 1])],
                                       problem.gold, info))
    tries = sum(b.key["arm"] == "decision" for b in branches)
    branches += [Branch({"problem_id": problem.id, "arm": "resample", "point": n, "rank": 0}, record["prompt_ids"], [],
                        problem.gold, {"position": -1, "entropy": None}) for n in range(tries)]
    return branches


def headroom(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    out_dir: str | os.PathLike,
    settings: HeadroomSettings = HeadroomSettings(),
    *,
    workers: Workers = Workers(),
    progress: bool = True,
) -> HeadroomReport | None:
    """Measure the headroom of decision-point steering for `model` on `problems` (see the module docstring).

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the base model.
        problems (`Sequence[Problem]`): problems with gold answers (held-back ones, not those you evaluate on).
        out_dir (`str` or `os.PathLike`): the run's folder; an interrupted run resumes there.
        settings ([`HeadroomSettings`]).
        workers ([`Workers`], *optional*), progress (`bool`): as for [`evaluate`].

    Returns:
        [`HeadroomReport`] (also written to `out_dir/headroom.json`) in the main process, `None` in the others.

    Example:

    ```python
    >>> report = headroom(model, tokenizer, load_problems("heldback.jsonl"), "runs/headroom")  # doctest: +SKIP
    >>> report.arms["decision"].fixed_share, report.arms["resample"].fixed_share  # doctest: +SKIP
    ```
    """
    out = Path(out_dir)
    greedy = RolloutSettings(samples=1, batch_size=settings.batch_size, seed=settings.seed,
                             instruction=settings.instruction,
                             decoding=DecodingSettings(temperature=0.0, max_new_tokens=settings.max_new_tokens))
    run_rollouts(model, tokenizer, problems, out / "base", greedy, workers=workers, progress=progress)
    by_id = {p.id: p for p in problems}
    records = [r for r in RolloutFolder(out / "base").records(("reward", "prompt_ids", "completion_ids"))
               if r["problem_id"] in by_id]
    records.sort(key=lambda r: r["problem_id"])
    scored = score_completions(model, records, settings.top_k)
    entropies = torch.cat([s.entropy for s in scored]).numpy()
    tau = settings.tau if settings.tau is not None else float(np.quantile(entropies, settings.tau_quantile))
    rng = random.Random(settings.seed)
    branches = [b for r, s in zip(records, scored) if r["reward"] <= 0
                for b in plan_branches(by_id[r["problem_id"]], r, s, tau, settings, rng)]
    decoding = BranchDecoding(settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed)
    job = Job(
        label="branches", unit="branch", folder=BranchFolder(out),
        settings={"model": model.name_or_path, **asdict(settings), "tau": tau},
        units=branches, unit_keys=lambda b: [b.unit_key()],
        batches=lambda pending: branch_batches(pending, settings.batch_size),
        work=lambda batch: continue_branches(model, tokenizer, batch, decoding),
    )
    result = run_job(job, workers, progress)
    if not workers.is_main:
        return None
    report = headroom_report(model.name_or_path, records, result.records, tau, np.sort(entropies))
    atomic_write_json(out / REPORT_FILE, asdict(report))
    try:
        plot_headroom(report, out / PLOT_FILE)
    except ImportError:
        pass
    return report


def headroom_report(model: str, base: Sequence[dict], branches: Sequence[dict], tau: float,
                    sorted_entropy: np.ndarray) -> HeadroomReport:
    """The report from the graded base completions and branch records (see [`HeadroomReport`])."""
    failures = [r["problem_id"] for r in base if r["reward"] <= 0]
    by_arm: dict[str, dict[str, list[dict]]] = {arm: defaultdict(list) for arm in ARMS}
    for record in branches:
        by_arm[record["arm"]][record["problem_id"]].append(record)
    arms = {arm: _arm(by_arm[arm], failures) for arm in ARMS}
    decision = by_arm["decision"]
    critical = [
        CriticalStep(r["problem_id"], r["position"], r["entropy"],
                     float(np.searchsorted(sorted_entropy, r["entropy"]) / max(1, len(sorted_entropy))), r["rank"])
        for tries in decision.values() for r in tries if r["correct"]
    ]
    first_point_fixed = sum(any(r["correct"] and r["point"] == 0 for r in tries) for tries in decision.values())
    correct = len(base) - len(failures)
    ranks: dict[str, int] = defaultdict(int)
    for step in critical:
        ranks[str(step.rank)] += 1
    return HeadroomReport(
        model=model, problems=len(base), base_accuracy=correct / len(base), failures=len(failures), tau=tau,
        branched=len(decision),
        tries_per_failure=arms["decision"].tries / len(decision) if decision else 0.0,
        arms=arms,
        ceiling_accuracy=(correct + arms["decision"].fixed) / len(base),
        oracle_accuracy=(correct + first_point_fixed) / len(base),
        critical=critical, rank_counts=dict(sorted(ranks.items())),
        median_entropy_percentile=float(np.median([c.entropy_percentile for c in critical])) if critical else None,
    )


def _arm(tries: dict[str, list[dict]], failures: list[str]) -> ArmHeadroom:
    records = [r for problem in failures for r in tries.get(problem, [])]
    fixed = sum(any(r["correct"] for r in tries.get(problem, [])) for problem in failures)
    return ArmHeadroom(
        tries=len(records), fixed=fixed, fixed_share=fixed / len(failures) if failures else 0.0,
        try_success=sum(r["correct"] for r in records) / len(records) if records else 0.0,
    )


def plot_headroom(report: HeadroomReport, path: Path) -> Path:
    """Draw the share of failures each arm fixes and the ranks of the fixing candidates; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(list(report.arms), [a.fixed_share for a in report.arms.values()], color=["C0", "C7", "C7"])
    left.set(ylabel="share of failures fixed", ylim=(0, 1),
             title=f"{report.tries_per_failure:.1f} tries per failure (base {report.base_accuracy:.0%})")
    right.bar(list(report.rank_counts), list(report.rank_counts.values()))
    right.set(xlabel="base rank of the fixing token", ylabel="fixing switches", title="Critical decision points")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
