"""The run folders of the offline pipeline, one module per format: each module names its files and fields, writes
them and reads them back, so that no other module composes a file name of a folder it does not own.

- :mod:`~steer.pipeline.folders.rollouts`: `steer rollout`'s folder (the rollout store);
- :mod:`~steer.pipeline.folders.scores`: `steer score`'s `scores/` subfolder (entropies and decision-point features);
- :mod:`~steer.pipeline.folders.predictions`: `steer eval`'s folder (predictions and their summary).

A head's folder is written and read by [`CorrectionHead`] (and `training.json` by
[`steer.pipeline.training.TrainingRecord`]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from steer.pipeline.store import read_jsonl

RolloutKey = tuple[str, int]
"""`(problem_id, sample)`: what identifies a rollout in every folder."""


class RunFolder:
    """What the run folders share: a path, a record store and a settings file, named by each subclass.

    Attributes:
        records_file (`str`), settings_file (`str`): file names inside the folder.
        key (`tuple[str, ...]`): the fields that identify a record.
        writer (`str`): the command that writes the folder, named when it is missing.
    """

    records_file: ClassVar[str]
    settings_file: ClassVar[str]
    key: ClassVar[tuple[str, ...]]
    writer: ClassVar[str]

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def records_path(self) -> Path:
        return self.path / self.records_file

    @property
    def settings_path(self) -> Path:
        return self.path / self.settings_file

    def read_records(self, required: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Every record, in file order, each checked to hold the key fields and `required`.

        Raises:
            `FileNotFoundError`: there is no record store yet (the message names the command that writes it).
            [`StoreError`]: a damaged record or a missing field, with its file and line.
        """
        if not self.records_path.is_file():
            raise FileNotFoundError(f"{self.records_path} is missing: run `{self.writer}` first")
        return list(read_jsonl(self.records_path, (*self.key, *required)))
