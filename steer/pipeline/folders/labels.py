"""The labels folder: branch labels of decision points, one record per (rollout, position, candidate rank,
continuation).

Layout of `ROLLOUTS_DIR/labels/` (written by `steer label`, see :mod:`steer.pipeline.labels`):

- `labels.jsonl`: the records ([`LabelRecord`]), appended as batches finish, so an interrupted run resumes;
- `labels.settings.json`: how they were made (a resumed run must use the same settings).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from steer.pipeline.folders import Record, RunFolder
from steer.pipeline.folders.rollouts import RolloutFolder

LABELS_DIR = "labels"
LabelPoint = tuple[str, int, int]
"""`(problem_id, sample, position)`: a labelled decision point of a rollout."""


@dataclass(frozen=True)
class LabelRecord(Record):
    """One continuation of one candidate of a labelled decision point, graded.

    Attributes:
        problem_id (`str`), sample (`int`): the rollout. position (`int`): the decision point's position in its
            completion. rank (`int`): the candidate's rank in the base top-k (1 is the base top-1).
        token (`int`): the candidate token.
        completion (`str`), completion_ids (`list[int]`): the continued completion (the rollout's prefix, the
            candidate, then the continuation), cut to the token budget (empty in folders written before labels
            kept them).
        correct (`bool`): whether it was graded right.
        continuation (`int`, defaults to 0): which of the candidate's continuations (one greedy, or several
            sampled: `LabelSettings.continuations`).
    """

    problem_id: str
    sample: int
    position: int
    rank: int
    token: int
    completion: str
    correct: bool
    completion_ids: list[int] = field(default_factory=list)
    continuation: int = 0

    @property
    def point(self) -> LabelPoint:
        return self.problem_id, self.sample, self.position


class LabelFolder(RunFolder[LabelRecord]):
    """`ROLLOUTS_DIR/labels/` (see the module docstring)."""

    records_file = "labels.jsonl"
    settings_file = "labels.settings.json"
    record_type = LabelRecord
    key = ("problem_id", "sample", "position", "rank", "continuation")
    writer = "steer label"
    # as labels were made before these settings (sampled continuations were drawn at the rollouts' T 0.6, top-p 0.95)
    implied_settings = {"placement": "first", "continuations": 1, "temperature": 0.6, "top_p": 0.95}

    @classmethod
    def of(cls, rollouts_dir: str | os.PathLike) -> LabelFolder:
        return cls(Path(rollouts_dir) / LABELS_DIR)

    def candidates(self) -> int:
        """Candidates labelled at each point: the recorded top-k, or the scores' own top-k where that is smaller
        (`plan_labels` labels the candidates the scores hold)."""
        top_k = int(self.recorded_settings()["top_k"])
        scores = RolloutFolder(self.path.parent).scores
        return min(top_k, int(scores.recorded_settings()["top_k"])) if scores.settings_path.exists() else top_k

    def success(self) -> dict[LabelPoint, list[float]]:
        """Per labelled point, the success of each candidate by rank (1, 2, ...): the share of its continuations
        graded right; points without every candidate ([`candidates`]) or with a candidate lacking some of its
        continuations (`LabelSettings.continuations`, as recorded) are left out (an interrupted run)."""
        continuations = self.recorded_settings()["continuations"]
        ranks = list(range(1, self.candidates() + 1))
        by_point: dict[LabelPoint, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for record in self.read_records():
            by_point[record.point][record.rank].append(record.correct)
        return {point: [sum(outcomes[r]) / continuations for r in ranks]
                for point, outcomes in by_point.items()
                if sorted(outcomes) == ranks and all(len(c) == continuations for c in outcomes.values())}
