"""The rollouts folder: sampled, graded completions of the base model, one record per (problem, sample).

Layout of a rollouts folder `DIR`:

- `rollouts.jsonl`: the records ([`RolloutRecord`]), appended as batches finish; see [`RecordStore`];
- `rollouts.settings.json`: how they were sampled (a resumed run must use the same settings);
- `scores/`: written by `steer score` (see :mod:`steer.pipeline.folders.scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from steer.pipeline.folders import Record, RolloutKey, RunFolder
from steer.pipeline.folders.scores import ScoreFolder

RECORDS_FILE = "rollouts.jsonl"
SETTINGS_FILE = "rollouts.settings.json"
SCORES_DIR = "scores"
KEY = ("problem_id", "sample")


class TokenSequence(Protocol):
    """A prompt and a completion as token ids: what a teacher-forced pass reads (a [`RolloutRecord`], or any other
    record with these two fields)."""

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def completion_ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class Tokens:
    """A [`TokenSequence`] of its own: a prompt and a completion as token ids, for a teacher-forced pass over a
    sequence that is not a rollout (a decode re-tokenised from its text, say).

    Example:

    ```python
    >>> sequence_length(Tokens([1, 2, 3], [4, 5]))
    5
    ```
    """

    prompt_ids: list[int]
    completion_ids: list[int]


def sequence_length(sequence: TokenSequence) -> int:
    """Prompt and completion tokens of `sequence`."""
    return len(sequence.prompt_ids) + len(sequence.completion_ids)


@dataclass(frozen=True)
class RolloutRecord(Record):
    """One rollout: a sampled, graded completion of one problem.

    Attributes:
        problem_id (`str`): the problem's id in its benchmark.
        sample (`int`): the rollout's index among the problem's rollouts (0, 1, ...).
        benchmark (`str`): the benchmark's label.
        gold (`str`, *optional*): the gold answer (an imported rollout may come with its reward alone).
        prompt (`str`): the text the model continued (chat template applied).
        prompt_ids (`list[int]`): the prompt's token ids (not empty).
        completion (`str`): the generated text, special tokens removed.
        completion_ids (`list[int]`): the generated token ids, up to and including the end-of-sequence token.
        answer (`str`, *optional*): the answer extracted from the completion.
        reward (`float`): 1.0 if the answer is right, else 0.0 (or a reward function's value).
        finish_reason (`str`): `"stop"` (end-of-sequence token) or `"length"` (token budget reached).
        num_tokens (`int`): `len(completion_ids)`.
    """

    problem_id: str
    sample: int
    benchmark: str
    gold: str | None
    prompt: str
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    answer: str | None
    reward: float
    finish_reason: str
    num_tokens: int

    @property
    def key(self) -> RolloutKey:
        """`(problem_id, sample)`."""
        return self.problem_id, self.sample


class RolloutFolder(RunFolder[RolloutRecord]):
    """A rollouts folder (see the module docstring).

    Args:
        path (`str` or `os.PathLike`): the folder.

    Example:

    ```python
    >>> folder = RolloutFolder("runs/rollouts")  # doctest: +SKIP
    >>> rewards = [record.reward for record in folder.read_records()]  # doctest: +SKIP
    ```
    """

    records_file = RECORDS_FILE
    settings_file = SETTINGS_FILE
    record_type = RolloutRecord
    key = KEY
    writer = "steer rollout"

    @property
    def scores(self) -> ScoreFolder:
        return ScoreFolder(self.path / SCORES_DIR)
