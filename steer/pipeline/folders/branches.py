"""The headroom folder: the branches `steer analyze headroom` tried, one record per branch (see
:mod:`steer.analysis.headroom`).

Layout of a headroom run folder `DIR`:

- `branches.jsonl`: the records ([`BranchRecord`]), appended round by round, so an interrupted run resumes;
- `headroom.settings.json`: how they were made (a resumed run must use the same settings);
- `base/`: the greedy completions branched from, a rollouts folder (:mod:`steer.pipeline.folders.rollouts`).
"""

from __future__ import annotations

from dataclasses import dataclass

from steer.pipeline.folders import Record, RunFolder


@dataclass(frozen=True)
class BranchRecord(Record):
    """One branch of a failed base completion, continued and graded.

    Attributes:
        problem_id (`str`): the failure's problem.
        arm (`str`): `"decision"` (switches at decision points), `"random"` (switches at random calm steps) or
            `"resample"` (a whole completion sampled from the prompt).
        path (`str`): its switches from the base completion on, `position:rank` each, `/`-separated (for a resample,
            `resample-N`).
        depth (`int`): the round it was tried in (0 for a resample). point (`int`): which of the round's points.
        position (`int`), rank (`int`): its last switch (-1 and 0 for a resample).
        entropy (`float`, *optional*): the base entropy at that position (`None` for a resample).
        completion (`str`), completion_ids (`list[int]`): the continued completion, cut to the token budget.
        correct (`bool`): whether it was graded right.
    """

    problem_id: str
    arm: str
    path: str
    depth: int
    point: int
    position: int
    rank: int
    entropy: float | None
    completion: str
    completion_ids: list[int]
    correct: bool


class BranchFolder(RunFolder[BranchRecord]):
    """A headroom run's folder (see the module docstring)."""

    records_file = "branches.jsonl"
    settings_file = "headroom.settings.json"
    record_type = BranchRecord
    key = ("problem_id", "arm", "path")
    writer = "steer analyze headroom"
