"""The labels folder: branch labels of decision points, one record per (rollout, position, candidate rank).

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

LABELS_DIR = "labels"
LabelPoint = tuple[str, int, int]
"""`(problem_id, sample, position)`: a labelled decision point of a rollout."""


@dataclass(frozen=True)
class LabelRecord(Record):
    """One candidate of a labelled decision point, continued greedily and graded.

    Attributes:
        problem_id (`str`), sample (`int`): the rollout. position (`int`): the decision point's position in its
            completion. rank (`int`): the candidate's rank in the base top-k (1 is the base top-1).
        token (`int`): the candidate token.
        completion (`str`), completion_ids (`list[int]`): the continued completion (the rollout's prefix, the
            candidate, then the greedy continuation), cut to the token budget (empty in folders written before
            labels kept them).
        correct (`bool`): whether it was graded right.
    """

    problem_id: str
    sample: int
    position: int
    rank: int
    token: int
    completion: str
    correct: bool
    completion_ids: list[int] = field(default_factory=list)

    @property
    def point(self) -> LabelPoint:
        return self.problem_id, self.sample, self.position


class LabelFolder(RunFolder[LabelRecord]):
    """`ROLLOUTS_DIR/labels/` (see the module docstring)."""

    records_file = "labels.jsonl"
    settings_file = "labels.settings.json"
    record_type = LabelRecord
    key = ("problem_id", "sample", "position", "rank")
    writer = "steer label"
    implied_settings = {"placement": "first"}  # labels were placed at each rollout's first decision points

    @classmethod
    def of(cls, rollouts_dir: str | os.PathLike) -> LabelFolder:
        return cls(Path(rollouts_dir) / LABELS_DIR)

    def success(self) -> dict[LabelPoint, list[float]]:
        """Per labelled point, the success of each candidate by rank (1, 2, ...); points with a rank missing (an
        interrupted run) are left out."""
        by_point: dict[LabelPoint, dict[int, float]] = defaultdict(dict)
        for record in self.read_records():
            by_point[record.point][record.rank] = float(record.correct)
        return {point: [ranks[r] for r in range(1, len(ranks) + 1)] for point, ranks in by_point.items()
                if sorted(ranks) == list(range(1, len(ranks) + 1))}
