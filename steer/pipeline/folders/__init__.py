"""The run folders of the offline pipeline, one module per format: each module names its files, defines the typed
record of its store, writes it and reads it back, so that no other module composes a file name of a folder it does
not own or reads a record field by a string.

- :mod:`~steer.pipeline.folders.rollouts`: `steer rollout`'s folder ([`RolloutRecord`]);
- :mod:`~steer.pipeline.folders.scores`: `steer score`'s `scores/` subfolder (entropies and decision-point features,
  indexed by [`ShardRecord`]);
- :mod:`~steer.pipeline.folders.labels`: `steer label`'s `labels/` subfolder ([`LabelRecord`]);
- :mod:`~steer.pipeline.folders.branches`: `steer analyze headroom`'s folder ([`BranchRecord`]);
- :mod:`~steer.pipeline.folders.predictions`: `steer eval`'s folder ([`PredictionRecord`] and their summary).

A head's folder is written and read by [`CorrectionHead`] (and `training.json` by
[`steer.pipeline.training.TrainingRecord`]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast

from steer.pipeline.store import RecordStore, read_jsonl

RolloutKey = tuple[str, int]
"""`(problem_id, sample)`: what identifies a rollout in every folder."""

R = TypeVar("R", bound="Record")


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of the records of a run folder's store: a frozen dataclass written as one JSON object per line.

    Fields without a default are required when a line is read (a line lacking one is an error naming the file and
    line); fields a line does not know keep their defaults, and keys a record does not know are ignored, so that
    folders written by earlier versions still read. Subclasses whose fields need converting from JSON (tuples,
    nested records) override [`Record.from_json`].
    """

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The fields without a default."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field with a plain default, and that default (a `default_factory` field is left out: as a key field it
        stays required)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in names})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunFolder(Generic[R]):
    """What the run folders share: a path, a record store of typed records and a settings file, named by each
    subclass.

    Attributes:
        records_file (`str`), settings_file (`str`): file names inside the folder.
        record_type (`type[Record]`): the records of its store.
        key (`tuple[str, ...]`): the fields that identify a record. A key field added after folders were written
            without it has a default in the record type, which its older records stand for ([`key_defaults`]).
        writer (`str`): the command that writes the folder, named when it is missing.
        implied_settings (`dict`): settings added to the folder's stage after folders were written without them,
            with the value those folders were made with (a settings file that lacks one reads as holding it).
    """

    records_file: ClassVar[str]
    settings_file: ClassVar[str]
    record_type: ClassVar[type[Record]]
    key: ClassVar[tuple[str, ...]]
    writer: ClassVar[str]
    implied_settings: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def records_path(self) -> Path:
        return self.path / self.records_file

    @property
    def settings_path(self) -> Path:
        return self.path / self.settings_file

    def recorded_settings(self) -> dict[str, Any]:
        """The settings the folder was made with (its settings file, with [`implied_settings`] where it lacks them)."""
        return {**self.implied_settings, **json.loads(self.settings_path.read_text(encoding="utf-8"))}

    @property
    def key_defaults(self) -> dict[str, Any]:
        """Each key field with a default in the record type (added later; older records lack it), and that default."""
        defaults = self.record_type.defaults()
        return {name: defaults[name] for name in self.key if name in defaults}

    @property
    def required_fields(self) -> tuple[str, ...]:
        """The fields every stored record must hold: the key fields without a default and the record's own."""
        fields = [name for name in self.key if name not in self.key_defaults] + list(self.record_type.required())
        return tuple(dict.fromkeys(fields))

    def store(self, path: Path | None = None) -> RecordStore:
        """The folder's record store, or a store of its records at another `path` (a worker's part)."""
        return RecordStore(path or self.records_path, self.key, self.key_defaults)

    def key_of(self, record: R) -> tuple:
        """The values of a record's key fields."""
        return tuple(getattr(record, name) for name in self.key)

    def parse(self, data: dict[str, Any]) -> R:
        """One line of the store as this folder's record."""
        return cast(R, self.record_type.from_json(data))

    def read_records(self) -> list[R]:
        """Every record, in file order.

        Raises:
            `FileNotFoundError`: there is no record store yet (the message names the command that writes it).
            [`StoreError`]: a damaged record or a missing field, with its file and line.
        """
        if not self.records_path.is_file():
            raise FileNotFoundError(f"{self.records_path} is missing: run `{self.writer}` first")
        return [self.parse(data) for data in read_jsonl(self.records_path, self.required_fields)]
