"""Step 3b (optional): label decision points by branching. For each labelled decision point of a rollout (its first
ones, or a seeded random draw among all of them: `LabelSettings.placement`), continue every one of the base top-k
candidates (greedily, or several times sampled: `LabelSettings.continuations`) and grade the result, so each
candidate gets its own success: a per-point target for the head (`steer train --labels branches`) instead of the
rollout-level advantage that spreads one reward over every decision point of a rollout.

The labels go to `ROLLOUTS_DIR/labels/` ([`LabelFolder`]): one record per (rollout, position, candidate rank,
continuation), appended as batches finish; an interrupted run resumes. They cost generated tokens:
[`LabelSummary.tokens`] counts them, so label sources can be compared on the same budget.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.pipeline.branching import Branch, BranchDecoding, Outcome, branch_batches, continue_branches
from steer.pipeline.decoding import Decoder
from steer.pipeline.distributed import Workers
from steer.pipeline.folders.labels import LabelFolder, LabelRecord
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutKey, RolloutRecord
from steer.pipeline.folders.scores import Features
from steer.pipeline.jobs import Job, run_job
from steer.pipeline.pool import resolve_tau, select_pool
from steer.pipeline.progress import Throughput
from steer.settings import LabelSettings


@dataclass(frozen=True)
class Candidate:
    """What a label records of its branch besides the outcome: the point, the candidate's rank and token, and which
    of its continuations."""

    problem_id: str
    sample: int
    position: int
    rank: int
    token: int
    continuation: int


def label_record(branch: Branch[Candidate], outcome: Outcome) -> LabelRecord:
    return LabelRecord(**asdict(branch.tag), completion=outcome.completion, completion_ids=outcome.completion_ids,
                       correct=outcome.correct)


@dataclass(frozen=True)
class LabelSummary(Throughput):
    """What a labelling run did: `branches` continued this run (their generated `tokens`, in `seconds`), the
    labelled `points` in the folder, and the `tau` used."""

    path: Path
    branches: int
    points: int
    tau: float


def _draw_order(seed: int, problem_id: str, sample: int, position: int) -> bytes:
    """A point's place in the seeded random draw: a hash, the same in every process and Python version."""
    return hashlib.sha256(f"{seed}/{problem_id}/{sample}/{position}".encode()).digest()


def labelled_rows(features: Features, tau: float, settings: LabelSettings) -> list[int]:
    """The rows of `features` to label: per rollout, `settings.points` of its decision points (entropy above `tau`),
    its first ones or a random draw seeded by `settings.seed` and the rollout's key; in feature order."""
    by_rollout: dict[int, list[int]] = defaultdict(list)
    for row in (features.point_entropy > tau).nonzero().squeeze(-1).tolist():
        by_rollout[int(features.point_rollout[row])].append(row)
    chosen = []
    for rollout, rows in by_rollout.items():
        if settings.placement == "random":
            problem_id, sample = features.keys[rollout]
            rows = sorted(rows, key=lambda row: _draw_order(settings.seed, problem_id, sample,
                                                            int(features.point_position[row])))
        chosen += rows[: settings.points]
    return sorted(chosen)


def plan_labels(features: Features, records: dict[RolloutKey, RolloutRecord], tau: float,
                settings: LabelSettings) -> list[Branch[Candidate]]:
    """For each top-k candidate at the labelled decision points of each rollout ([`labelled_rows`]), a greedy
    branch, or `settings.continuations` sampled ones."""
    branches = []
    for row in labelled_rows(features, tau, settings):
        rollout = int(features.point_rollout[row])
        problem_id, sample = features.keys[rollout]
        record = records[problem_id, sample]
        if record.gold is None:
            raise ValueError(f"rollout {problem_id!r} sample {sample} has no gold answer (imported with its reward "
                             "alone): branch continuations cannot be graded without one")
        position = int(features.point_position[row])
        for rank in range(1, min(settings.top_k, features.point_topk_ids.shape[1]) + 1):
            token = int(features.point_topk_ids[row, rank - 1])
            for continuation in range(settings.continuations):
                branches.append(Branch((problem_id, sample, position, rank, continuation), record.prompt_ids,
                                       record.completion_ids[:position] + [token], record.gold,
                                       Candidate(problem_id, sample, position, rank, token, continuation),
                                       sampled=settings.continuations > 1))
    return branches


def label_branches(
    model: PreTrainedModel | Decoder,
    tokenizer: PreTrainedTokenizerBase,
    rollouts_dir: str | os.PathLike,
    settings: LabelSettings = LabelSettings(),
    *,
    workers: Workers = Workers(),
    progress: bool = True,
) -> LabelSummary:
    """Label the decision points of the scored rollouts in `rollouts_dir` by branch continuations (see the module
    docstring).

    Example:

    ```python
    >>> label_branches(model, tokenizer, "runs/rollouts")  # doctest: +SKIP
    >>> train_head(model, "runs/rollouts", TrainSettings(labels="branches"))  # doctest: +SKIP
    ```
    """
    folder = RolloutFolder(rollouts_dir)
    rollouts = folder.read_records()
    pool = select_pool(rollouts, settings.pool_problems, keep_shortest=1.0)
    features = folder.scores.features(pool.keys)
    tau = resolve_tau(settings, torch.cat(features.entropy), features.floor)
    branches = plan_labels(features, {r.key: r for r in rollouts}, tau, settings)
    decoding = BranchDecoding(settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed)
    labels = LabelFolder.of(rollouts_dir)
    job = Job(
        label="labels", unit="branch", folder=labels,
        settings={"model": model.name_or_path, **asdict(settings), "tau": tau},
        units=branches, unit_keys=lambda b: [b.key],
        batches=lambda pending: branch_batches(pending, settings.batch_size),
        work=lambda batch: continue_branches(model, tokenizer, batch, decoding, label_record),
    )
    result = run_job(job, workers, progress)
    points = {r.point for r in result.records}
    return LabelSummary(tokens=result.totals.tokens, seconds=result.totals.seconds, path=labels.path,
                        branches=result.totals.items, points=len(points), tau=tau)
