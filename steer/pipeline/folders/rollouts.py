"""The rollouts folder: sampled, graded completions of the base model, one record per (problem, sample).

Layout of a rollouts folder `DIR`:

- `rollouts.jsonl`: the records (fields: [`FIELDS`]), appended as batches finish; see [`RecordStore`];
- `rollouts.settings.json`: how they were sampled (a resumed run must use the same settings);
- `scores/`: written by `steer score` (see :mod:`steer.pipeline.folders.scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steer.pipeline.folders import RolloutKey, RunFolder
from steer.pipeline.folders.scores import ScoreFolder

RECORDS_FILE = "rollouts.jsonl"
SETTINGS_FILE = "rollouts.settings.json"
SCORES_DIR = "scores"
KEY = ("problem_id", "sample")
FIELDS = {
    "problem_id": "str: the problem's id in its benchmark",
    "sample": "int: the rollout's index among the problem's rollouts (0, 1, ...)",
    "benchmark": "str: the benchmark's label",
    "gold": "str: the gold answer",
    "prompt": "str: the text the model continued (chat template applied)",
    "prompt_ids": "list[int]: the prompt's token ids (not empty)",
    "completion": "str: the generated text, special tokens removed",
    "completion_ids": "list[int]: the generated token ids, up to and including the end-of-sequence token",
    "answer": "str | null: the answer extracted from the completion",
    "reward": "float: 1.0 if the answer is right, else 0.0 (or a reward function's value)",
    "finish_reason": "str: 'stop' (end-of-sequence token) or 'length' (token budget reached)",
    "num_tokens": "int: len(completion_ids)",
}


def rollout_key(record: dict[str, Any]) -> RolloutKey:
    """`(problem_id, sample)` of a rollout record."""
    return record["problem_id"], record["sample"]


def rollout_length(record: dict[str, Any]) -> int:
    """Prompt and completion tokens of a rollout record."""
    return len(record["prompt_ids"]) + len(record["completion_ids"])


class RolloutFolder(RunFolder):
    """A rollouts folder (see the module docstring).

    Args:
        path (`str` or `os.PathLike`): the folder.

    Example:

    ```python
    >>> folder = RolloutFolder("runs/rollouts")  # doctest: +SKIP
    >>> rewards = [record["reward"] for record in folder.records()]  # doctest: +SKIP
    ```
    """

    records_file = RECORDS_FILE
    settings_file = SETTINGS_FILE
    key = KEY
    writer = "steer rollout"

    @property
    def scores(self) -> ScoreFolder:
        return ScoreFolder(self.path / SCORES_DIR)

    def records(self, required: Sequence[str] = ("reward", "num_tokens")) -> list[dict[str, Any]]:
        """Every rollout record, in file order, each checked to hold the key fields and `required`."""
        return self.read_records(required)
