"""Append-only record stores (JSONL) that survive being killed at any moment, and the settings check that keeps a
resumed run from mixing records made differently."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steer.errors import SteerError
from steer.files import atomic_write_json


class StoreError(SteerError, ValueError):
    """A record store on disk is damaged or was made with other settings."""


class RecordStore:
    """An append-only JSONL file of records, each identified by a key, that survives being killed at any moment.

    Every record is written as one line and flushed at once. A kill can leave at most a partial last line; opening
    the store again drops it, so the next append starts on a clean line. A damaged line anywhere else is an error
    naming the file and line. Records already present are known by key, so a resumed run skips them and nothing is
    written twice.

    Args:
        path (`str` or `os.PathLike`): the `.jsonl` file (created, with its folder, if missing).
        key_fields (`tuple[str, ...]`): the fields whose values identify a record.
        key_defaults (`Mapping[str, Any]`, *optional*): key fields added after records were written without them,
            with the value such records stand for; every other key field is required in each record.

    Example:

    ```python
    >>> store = RecordStore("out/rollouts.jsonl", key_fields=("problem_id", "sample"))  # doctest: +SKIP
    >>> if ("p1", 0) not in store:  # doctest: +SKIP
    ...     store.append({"problem_id": "p1", "sample": 0, "reward": 1})
    ```
    """

    def __init__(self, path: str | os.PathLike, key_fields: tuple[str, ...],
                 key_defaults: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.key_fields = key_fields
        self.key_defaults = dict(key_defaults or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._keys: set[tuple] = set()
        self._drop_partial_last_line()
        for record in self.records():
            self._keys.add(self.key(record))

    def key(self, record: dict[str, Any]) -> tuple:
        return tuple(record[field] if field in record else self.key_defaults[field] for field in self.key_fields)

    @property
    def required(self) -> tuple[str, ...]:
        """The key fields every record must hold (those without a default)."""
        return tuple(field for field in self.key_fields if field not in self.key_defaults)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def records(self) -> list[dict[str, Any]]:
        """All records in file order."""
        return list(read_jsonl(self.path, required=self.required))

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (skipped if a record with its key is already stored) and flush it to disk."""
        self.extend([record])

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Write records whose keys are new, as complete lines, flushed and synced before returning."""
        lines = []
        for record in records:
            key = self.key(record)
            if key not in self._keys:
                self._keys.add(key)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())

    def _drop_partial_last_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (), partial_tail: bool = False):
    """Yield the JSON objects of a JSONL file, skipping blank lines; a damaged line or a record missing a `required`
    field raises [`StoreError`] naming the file and line. With `partial_tail`, a last line without its newline
    (a write in progress, or cut by a kill) is skipped instead."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or (partial_tail and not line.endswith("\n")):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise StoreError(f"{path}:{number}: damaged record ({err.msg})") from None
            if not isinstance(record, dict):
                raise StoreError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [field for field in required if field not in record]
            if missing:
                raise StoreError(f"{path}:{number}: record lacks {', '.join(missing)}")
            yield record


def check_settings(path: str | os.PathLike, settings: dict[str, Any], implied: Mapping[str, Any] = {}) -> None:
    """Record the settings a store was made with, or check that a resumed run uses the same ones.

    `implied` holds settings added after stores were written without them, with the value such a store was made
    with: a stored file that lacks one reads as holding it.

    Raises [`StoreError`] listing each setting that differs, so that a resumed run never mixes records made
    differently.
    """
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # compare as JSON: tuples and lists are the same setting
    if not path.exists():
        atomic_write_json(path, settings)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    saved = {**implied, **saved}
    differences = [
        f"{name}: stored {saved.get(name)!r}, now {settings.get(name)!r}"
        for name in sorted(settings.keys() | saved.keys())
        if saved.get(name) != settings.get(name)
    ]
    if differences:
        raise StoreError(
            f"{path.parent} was made with other settings ({'; '.join(differences)}); "
            "use another output folder, or the same settings to resume"
        )
