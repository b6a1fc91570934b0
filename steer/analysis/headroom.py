"""Headroom: how much could any decision-point steering gain on this model and task, before a head is trained?

For every problem the base model gets wrong (greedy), branch its completion at its decision points (base entropy
above tau, the tau a head trained on the same model would get, or a trained head's own), the highest-entropy ones
first, up to `points` of them: replace the base choice by each other top-k candidate in turn, continue greedily, and
grade. A branch that still fails is branched again at its own decision points after its switch, for `rounds` rounds
in all (the `beam` likeliest failed branches of a failure go on), because a head acts at every decision point it
meets and a failure may need more than one choice set right. The share of failures that such switches fix is the
ceiling of steering at decision points (`ceiling_accuracy`); one switch alone gives `one_switch_accuracy`, and an
oracle head that picks the best candidate at the failure's highest-entropy decision point `oracle_accuracy`.

Two controls get exactly as many tries per failure:

- `random`: the same switches (the same candidate ranks, the same rounds) at random calm steps, below tau. If
  switches at decision points fix no more failures than these, the choices that decide a completion are not at its
  decision points, and a head that acts there has nothing to learn: this is the control the verdict rests on.
- `resample`: whole completions sampled from the prompt (temperature and top-p of the settings), no switch: what
  more samples reach. It says how much of the failures is luck; it is not a rival to a head (picking the right
  sample needs a verifier, which decoding does not have), and a failure that resampling fixes is often one whose
  outcome a single choice decides, which is what a head learns to make.

The report ends in a verdict, `go`, `no-go` or `unclear`, and its reason in one line: `go` when the ceiling gains at
least `min_gain` over base and decision-point switches fix significantly more failures than random ones (exact
McNemar test over the failures, p < 0.05). (Related: the "critical tokens" of Lin et al., ICML 2025.)

Outputs, under the run's folder: `base/` (a rollouts folder: the greedy completions, graded), `branches.jsonl` with
`headroom.settings.json` (one record per branch, keyed by its path of switches; resumable round by round),
`headroom.json` (the [`HeadroomReport`]) and, with matplotlib installed, `headroom.png`.
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
from steer.pipeline.branching import Branch, BranchDecoding, Outcome, branch_batches, continue_branches
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.distributed import Workers
from steer.pipeline.folders.branches import BranchFolder, BranchRecord
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutRecord, TokenSequence, sequence_length
from steer.pipeline.jobs import Job, run_job
from steer.pipeline.metrics import McNemar, mcnemar, wilson_interval
from steer.pipeline.pool import resolve_tau
from steer.pipeline.problems import Problem
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import teacher_force, token_batches
from steer.settings import HeadroomSettings

REPORT_FILE = "headroom.json"
PLOT_FILE = "headroom.png"
ARMS = ("decision", "random", "resample")
SWITCH_ARMS = ("decision", "random")
VERDICTS = ("go", "no-go", "unclear")
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Switch:
    """What a branch's record holds besides its outcome (see [`BranchRecord`])."""

    problem_id: str
    arm: str
    path: str
    depth: int
    point: int
    position: int
    rank: int
    entropy: float | None


def branch_record(branch: Branch[Switch], outcome: Outcome) -> BranchRecord:
    return BranchRecord(**asdict(branch.tag), completion=outcome.completion, completion_ids=outcome.completion_ids,
                        correct=outcome.correct)


@dataclass(frozen=True)
class ArmHeadroom:
    """One arm: its `tries` over all failures, the failures that at least one try fixed (`fixed`, their share and its
    95% Wilson interval, `None` without failures), and the share of tries that succeeded."""

    tries: int
    fixed: int
    fixed_share: float
    fixed_interval: tuple[float, float] | None
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
        decision_points (`float`), points_tried (`float`): mean decision points per branched failure, and mean
            branched; untried_failures (`int`): branched failures with more decision points than were branched.
        tries_per_failure (`float`): mean tries per branched failure, the same in every arm.
        arms (`dict[str, ArmHeadroom]`): `decision`, `random`, `resample`.
        decision_vs_random ([`McNemar`]): exact McNemar test over the failures: `gained` (fixed by a decision-point
            switch, not by a random one), `lost` (the reverse), `p_value`.
        ceiling_accuracy (`float`): accuracy if every failure that decision-point switches fix (up to `rounds` in a
            row) were fixed; fixed_by_round (`list[int]`): failures fixed by then, after each round.
        one_switch_accuracy (`float`): the same with one switch.
        oracle_accuracy (`float`): accuracy of an oracle choosing the best candidate at each failure's
            highest-entropy decision point.
        critical (`list[CriticalStep]`): the fixing switches; rank_counts (`dict[str, int]`): their ranks.
        median_entropy_percentile (`float | None`): of the fixing switches' steps.
        verdict (`str`): `go`, `no-go` or `unclear` (see the module docstring); reason (`str`): why, in one line.
    """

    model: str
    problems: int
    base_accuracy: float
    failures: int
    tau: float
    branched: int
    decision_points: float
    points_tried: float
    untried_failures: int
    tries_per_failure: float
    arms: dict[str, ArmHeadroom]
    decision_vs_random: McNemar
    ceiling_accuracy: float
    fixed_by_round: list[int]
    one_switch_accuracy: float
    oracle_accuracy: float
    critical: list[CriticalStep]
    rank_counts: dict[str, int]
    median_entropy_percentile: float | None
    verdict: str
    reason: str


@dataclass(frozen=True)
class Trial:
    """A completion the search may switch: a failure's base completion, or a branch that still failed. Switches go
    only to positions after `after` (the position of its last switch; -1 for a base completion)."""

    problem_id: str
    arm: str
    path: str
    prompt_ids: list[int]
    completion_ids: list[int]
    after: int = -1


@dataclass(frozen=True)
class _Scored:
    """Per position of a base completion: entropy `[T]` and the base top-k ids `[T, k]`."""

    entropy: torch.Tensor
    topk: torch.Tensor


def score_completions(model: PreTrainedModel, rollouts: Sequence[TokenSequence], top_k: int) -> list[_Scored]:
    """Teacher-force `model` over each completion; per completion position its entropy and top-k ids."""
    order = sorted(range(len(rollouts)), key=lambda i: sequence_length(rollouts[i]))
    scored: list[_Scored | None] = [None] * len(rollouts)
    for batch in token_batches([rollouts[i] for i in order], 4096):
        group = [rollouts[order[i]] for i in batch]
        for index, (logits, _) in zip(batch, teacher_force(model, group)):
            stats = entropy_topk(logits, min(top_k, logits.shape[-1]))
            scored[order[index]] = _Scored(stats.entropy.cpu(), stats.indices.cpu())
    return scored


def decision_points(scored: _Scored, tau: float, points: int, after: int = -1) -> tuple[int, list[int]]:
    """How many steps of a completion after `after` are decision points (entropy above `tau`), and the `points` of
    them with the highest entropy, highest first."""
    gated = [t for t in (scored.entropy > tau).nonzero().squeeze(-1).tolist() if t > after]
    return len(gated), sorted(gated, key=lambda t: -float(scored.entropy[t]))[:points]


def _switch(trial: Trial, scored: _Scored, position: int, rank: int, gold: str, depth: int,
            point: int) -> Branch[Switch]:
    """The branch of `trial` whose token at `position` is the base candidate of `rank` instead."""
    path = f"{trial.path}/{position}:{rank}".lstrip("/")
    prefix = trial.completion_ids[:position] + [int(scored.topk[position, rank - 1])]
    return Branch((trial.problem_id, trial.arm, path), trial.prompt_ids, prefix, gold,
                  Switch(trial.problem_id, trial.arm, path, depth, point, position, rank,
                         float(scored.entropy[position])))


def plan_round(trials: Sequence[Trial], scores: Sequence[_Scored], golds: dict[str, str], tau: float,
               settings: HeadroomSettings, depth: int) -> list[Branch[Switch]]:
    """One round of switches: for each `decision` trial, every alternative candidate (ranks 2 to top-k) at its
    `points` highest-entropy decision points after its last switch; for the failure's `random` trials, as many
    switches with the same ranks at random calm steps (entropy at most tau) after theirs."""
    ranks = range(2, settings.top_k + 1)
    by_problem: dict[str, dict[str, list[tuple[Trial, _Scored]]]] = defaultdict(lambda: defaultdict(list))
    for trial, scored in zip(trials, scores):
        by_problem[trial.problem_id][trial.arm].append((trial, scored))
    branches = []
    for problem, arms in by_problem.items():
        points = [(trial, scored, t, j) for trial, scored in arms["decision"]
                  for j, t in enumerate(decision_points(scored, tau, settings.points, trial.after)[1])]
        branches += [_switch(trial, scored, t, rank, golds[problem], depth, j)
                     for trial, scored, t, j in points for rank in ranks if rank <= scored.topk.shape[1]]
        rng = random.Random(f"{settings.seed}/{problem}/{depth}")
        calm = [(trial, scored, [t for t in range(trial.after + 1, len(trial.completion_ids))
                                 if scored.entropy[t] <= tau]) for trial, scored in arms["random"]]
        for _, _, steps in calm:
            rng.shuffle(steps)
        for n in range(len(points) if calm else 0):
            trial, scored, steps = calm[n % len(calm)]
            if steps:
                t = steps.pop()
                branches += [_switch(trial, scored, t, rank, golds[problem], depth, n)
                             for rank in ranks if rank <= scored.topk.shape[1]]
    return branches


def next_trials(records: Sequence[BranchRecord], depth: int, beam: int,
                prompts: dict[str, list[int]]) -> list[Trial]:
    """The failed branches of round `depth` that go on: per failure and arm, the `beam` likeliest switches (lowest
    rank, then highest entropy); `prompts` gives each failure's prompt ids. A failure goes on in both arms until
    both have fixed it, so that the random arm's budget, which follows the decision arm's, is the same in every
    round."""
    fixed: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.correct and r.arm in SWITCH_ARMS:
            fixed[r.problem_id].add(r.arm)
    failed: dict[tuple[str, str], list[BranchRecord]] = defaultdict(list)
    for r in records:
        done = fixed[r.problem_id] == set(SWITCH_ARMS)
        if r.arm in SWITCH_ARMS and r.depth == depth and not r.correct and not done:
            failed[(r.problem_id, r.arm)].append(r)
    return [Trial(r.problem_id, r.arm, r.path, prompts[r.problem_id], r.completion_ids, r.position)
            for group in failed.values() for r in sorted(group, key=lambda r: (r.rank, -r.entropy))[:beam]]


def resamples(records: Sequence[BranchRecord], failures: Sequence[RolloutRecord]) -> list[Branch[Switch]]:
    """Per failure, as many whole completions sampled from the prompt as the decision arm tried."""
    tries: dict[str, int] = defaultdict(int)
    for r in records:
        tries[r.problem_id] += r.arm == "decision"
    return [Branch((f.problem_id, "resample", f"resample-{n}"), f.prompt_ids, [], f.gold,
                   Switch(f.problem_id, "resample", f"resample-{n}", 0, n, -1, 0, None), sampled=True)
            for f in failures for n in range(tries[f.problem_id])]


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
    >>> report.verdict, report.ceiling_accuracy, report.arms["random"].fixed_share  # doctest: +SKIP
    ```
    """
    out = Path(out_dir)
    greedy = RolloutSettings(samples=1, batch_size=settings.batch_size, seed=settings.seed,
                             instruction=settings.instruction,
                             decoding=DecodingSettings(temperature=0.0, max_new_tokens=settings.max_new_tokens))
    run_rollouts(model, tokenizer, problems, out / "base", greedy, workers=workers, progress=progress)
    by_id = {p.id: p for p in problems}
    records = [r for r in RolloutFolder(out / "base").read_records() if r.problem_id in by_id]
    records.sort(key=lambda r: r.problem_id)
    base_scores = score_completions(model, records, settings.top_k)
    entropies = torch.cat([s.entropy for s in base_scores])
    tau = resolve_tau(settings, entropies)
    failures = [r for r in records if r.reward <= 0]
    golds = {r.problem_id: r.gold for r in failures}
    folder = BranchFolder(out)
    decoding = BranchDecoding(settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed)
    job_settings = {"model": model.name_or_path, **asdict(settings), "tau": tau}

    def run(units: list[Branch[Switch]], label: str) -> list[BranchRecord]:
        run_job(Job(label=label, unit="branch", folder=folder, settings=job_settings, units=units,
                    unit_keys=lambda b: [b.key],
                    batches=lambda pending: branch_batches(pending, settings.batch_size),
                    work=lambda batch: continue_branches(model, tokenizer, batch, decoding, branch_record)),
                workers, progress)
        return folder.read_records()  # every process plans the next round from the merged store

    scored = dict(zip((r.problem_id for r in records), base_scores))
    trials = [Trial(r.problem_id, arm, "", r.prompt_ids, r.completion_ids) for r in failures for arm in SWITCH_ARMS]
    scores = [scored[t.problem_id] for t in trials]
    branched: list[BranchRecord] = []
    for depth in range(1, settings.rounds + 1):
        if not trials:
            break
        branched = run(plan_round(trials, scores, golds, tau, settings, depth), f"branches, round {depth}")
        trials = next_trials(branched, depth, settings.beam, {r.problem_id: r.prompt_ids for r in failures})
        scores = score_completions(model, trials, settings.top_k) if trials else []
    branched = run(resamples(branched, failures), "resamples")
    if not workers.is_main:
        return None
    points = {pid: decision_points(scored[pid], tau, settings.points) for pid in golds}
    report = headroom_report(model.name_or_path, records, branched, tau, np.sort(entropies.numpy()),
                             {pid: (found, len(tried)) for pid, (found, tried) in points.items()}, settings)
    atomic_write_json(out / REPORT_FILE, asdict(report))
    try:
        plot_headroom(report, out / PLOT_FILE)
    except ImportError:
        pass
    return report


def headroom_report(model: str, base: Sequence[RolloutRecord], branches: Sequence[BranchRecord], tau: float,
                    sorted_entropy: np.ndarray, points: dict[str, tuple[int, int]],
                    settings: HeadroomSettings) -> HeadroomReport:
    """The report from the graded base completions and branch records (see [`HeadroomReport`]); `points` gives, per
    failed problem, its decision points and how many of them were branched."""
    failures = [r.problem_id for r in base if r.reward <= 0]
    by_arm: dict[str, dict[str, list[BranchRecord]]] = {arm: defaultdict(list) for arm in ARMS}
    for record in branches:
        by_arm[record.arm][record.problem_id].append(record)
    arms = {arm: _arm(by_arm[arm], failures) for arm in ARMS}
    fixed = {arm: [any(r.correct for r in by_arm[arm].get(p, [])) for p in failures] for arm in ARMS}
    decision_vs_random = mcnemar(fixed["random"], fixed["decision"])
    decision = by_arm["decision"]
    branched = [points[p] for p in failures if points.get(p, (0, 0))[0] > 0]
    critical = [
        CriticalStep(r.problem_id, r.position, r.entropy,
                     float(np.searchsorted(sorted_entropy, r.entropy) / max(1, len(sorted_entropy))), r.rank)
        for tries in decision.values() for r in tries if r.correct
    ]
    def fixed_by(rule) -> int:
        return sum(any(r.correct and rule(r) for r in tries) for tries in decision.values())

    first_point_fixed = fixed_by(lambda r: r.depth == 1 and r.point == 0)
    by_round = [fixed_by(lambda r, d=depth: r.depth <= d) for depth in range(1, settings.rounds + 1)]
    correct = len(base) - len(failures)
    ranks: dict[str, int] = defaultdict(int)
    for step in critical:
        ranks[str(step.rank)] += 1
    base_accuracy = correct / len(base)
    ceiling = (correct + arms["decision"].fixed) / len(base)
    oracle = (correct + first_point_fixed) / len(base)
    verdict, reason = headroom_verdict(len(failures), len(branched), tau, arms, decision_vs_random, base_accuracy,
                                       ceiling, oracle, settings.min_gain)
    return HeadroomReport(
        model=model, problems=len(base), base_accuracy=base_accuracy, failures=len(failures), tau=tau,
        branched=len(branched),
        decision_points=float(np.mean([found for found, _ in branched])) if branched else 0.0,
        points_tried=float(np.mean([tried for _, tried in branched])) if branched else 0.0,
        untried_failures=sum(found > tried for found, tried in branched),
        tries_per_failure=arms["decision"].tries / len(branched) if branched else 0.0,
        arms=arms, decision_vs_random=decision_vs_random, ceiling_accuracy=ceiling, fixed_by_round=by_round,
        one_switch_accuracy=(correct + by_round[0]) / len(base), oracle_accuracy=oracle,
        critical=critical, rank_counts=dict(sorted(ranks.items())),
        median_entropy_percentile=float(np.median([c.entropy_percentile for c in critical])) if critical else None,
        verdict=verdict, reason=reason,
    )


def headroom_verdict(failures: int, branched: int, tau: float, arms: dict[str, ArmHeadroom],
                     decision_vs_random: McNemar, base: float, ceiling: float, oracle: float,
                     min_gain: float) -> tuple[str, str]:
    """`go`, `no-go` or `unclear`, and why (see the module docstring)."""
    if failures == 0:
        return "no-go", "the base model solves every problem: there is nothing to gain"
    if branched == 0:
        return "no-go", f"no failed completion has a decision point above tau = {tau:.3f} nats: nothing to switch"
    d, r, s = (arms[arm].fixed for arm in ARMS)
    p = decision_vs_random.p_value
    controls = (f"switches fix {d}/{failures} failures at decision points against {r}/{failures} at random calm "
                f"steps (p = {p:.2g}); resampling fixes {s}/{failures} at the same budget")
    if ceiling - base < min_gain:
        return "no-go", f"the ceiling {ceiling:.3f} is within {min_gain:g} of base {base:.3f}: {controls}"
    if d <= r:
        return "no-go", f"decision points are worth no more than random steps: {controls}"
    if p >= SIGNIFICANCE:
        return "unclear", f"{controls}: not significant, branch more held-back problems"
    return "go", (f"a head could reach {ceiling:.3f} (oracle at the highest-entropy point {oracle:.3f}) from "
                  f"{base:.3f}: {controls}")


def _arm(tries: dict[str, list[BranchRecord]], failures: list[str]) -> ArmHeadroom:
    records = [r for problem in failures for r in tries.get(problem, [])]
    fixed = sum(any(r.correct for r in tries.get(problem, [])) for problem in failures)
    return ArmHeadroom(
        tries=len(records), fixed=fixed, fixed_share=fixed / len(failures) if failures else 0.0,
        fixed_interval=wilson_interval(fixed, len(failures)) if failures else None,
        try_success=sum(r.correct for r in records) / len(records) if records else 0.0,
    )


def plot_headroom(report: HeadroomReport, path: Path) -> Path:
    """Draw the share of failures each arm fixes and the ranks of the fixing candidates; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    shares = [a.fixed_share for a in report.arms.values()]
    intervals = [a.fixed_interval or (share, share) for share, a in zip(shares, report.arms.values())]
    errors = [[share - low for share, (low, _) in zip(shares, intervals)],
              [high - share for share, (_, high) in zip(shares, intervals)]]
    left.bar(list(report.arms), shares, yerr=errors, capsize=4, color=["C0", "C7", "C7"])
    left.set(ylabel="share of failures fixed (95% interval)", ylim=(0, 1),
             title=f"{report.verdict}: {report.tries_per_failure:.1f} tries per failure (base "
                   f"{report.base_accuracy:.0%})")
    right.bar(list(report.rank_counts), list(report.rank_counts.values()))
    right.set(xlabel="base rank of the fixing token", ylabel="fixing switches", title="Critical decision points")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
