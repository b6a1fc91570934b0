"""The one job loop of the pipeline: resumable, shared among processes, with a progress bar and totals.

A stage (rollouts, scoring, evaluation, branch continuations, ...) describes its work as a [`Job`]: the units of work,
the record keys each unit produces, how units are grouped into batches, and a function from a batch to records.
[`run_job`] does the rest, the same way for every stage:

1. checks the stage's settings against those of an earlier run in the same folder ([`check_settings`]);
2. opens the record store and finds the units whose records are not all there yet;
3. forms batches from the whole pending list, then gives each process every `world`-th batch, so that a batch (its
   seed, its padding) is the same however many processes run;
4. runs the batches, appending each batch's records to this process's store (the main store for a single process,
   a part file per process otherwise) as soon as it is done, and drives a progress bar;
5. totals the job over the processes, and the main process merges the parts into the main store and reads it back.

A killed run leaves at most a partial last line, which the next run drops: nothing is lost or written twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from steer.pipeline.distributed import Workers
from steer.pipeline.folders import Record, RunFolder
from steer.pipeline.progress import Throughput, ThroughputBar
from steer.pipeline.store import RecordStore, check_settings, read_jsonl

U = TypeVar("U")
R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Work(Generic[R]):
    """What one batch produced.

    Attributes:
        records (`list[Record]`): records for the store (those whose keys are already stored are skipped).
        items (`int`): sequences or rollouts handled, for the progress bar and the totals.
        tokens (`int`): tokens generated or scored.
        counts (`dict[str, int]`): other counts to total over the job (for example stored points).
    """

    records: list[R]
    items: int
    tokens: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JobTotals(Throughput):
    """The whole job's counts, summed over the processes; `seconds` is the slowest process's."""

    items: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult(Generic[R]):
    """Every record in the store after the job (main process only; other processes get `[]`) and the totals."""

    records: list[R]
    totals: JobTotals


@dataclass(frozen=True)
class Job(Generic[U, R]):
    """A resumable, shareable stage: units of type `U` make records of type `R`, the folder's record type.

    Attributes:
        label (`str`), unit (`str`): the progress bar's label and what it counts.
        folder ([`RunFolder`]): where the records go (its record store) and the settings file.
        settings (`dict`): the settings the folder must hold (those of an earlier run there, if any).
        units (`Sequence[U]`): all units of work, done or not.
        unit_keys (`Callable[[U], Iterable[tuple]]`): the record keys a unit produces; a unit is pending while any
            of them is missing.
        batches (`Callable[[list[U]], Iterable[list[U]]]`): groups the pending units into batches.
        work (`Callable[[list[U]], Work]`): runs one batch.
        covered_keys (`Callable[[R], Iterable[tuple]]`, *optional*): the unit keys a stored record accounts for; by
            default the record's own key.
        items_per_unit (`int`, defaults to 1): items a unit makes (the progress bar's total).
        count_names (`tuple[str, ...]`): the names of [`Work.counts`] to total.

    Example:

    ```python
    >>> job = Job("squares", "item", SquaresFolder("out"), {}, units=range(10),  # doctest: +SKIP
    ...           unit_keys=lambda n: [(n,)], batches=lambda pending: [pending],
    ...           work=lambda batch: Work([Square(n, n * n) for n in batch], len(batch), 0))
    >>> run_job(job).totals.items  # doctest: +SKIP
    10
    ```
    """

    label: str
    unit: str
    folder: RunFolder[R]
    settings: dict[str, Any]
    units: Sequence[U]
    unit_keys: Callable[[U], Iterable[tuple]]
    batches: Callable[[list[U]], Iterable[list[U]]]
    work: Callable[[list[U]], Work[R]]
    covered_keys: Callable[[R], Iterable[Hashable]] | None = None
    items_per_unit: int = 1
    count_names: tuple[str, ...] = ()


def run_job(job: Job[U, R], workers: Workers = Workers(), progress: bool = True) -> JobResult[R]:
    """Run the pending part of `job` (see the module docstring); every process of the job must call it."""
    folder = job.folder
    if workers.is_main:
        check_settings(folder.settings_path, job.settings, implied=folder.implied_settings)
    store, existing = open_store(folder, workers)
    covered = job.covered_keys or (lambda record: [folder.key_of(record)])
    done = {key for data in existing for key in covered(folder.parse(data))}
    pending = [unit for unit in job.units if any(key not in done for key in job.unit_keys(unit))]
    mine = workers.share(list(job.batches(pending)))
    bar = ThroughputBar(sum(map(len, mine)) * job.items_per_unit, job.label, job.unit, progress and workers.is_main)
    counts: Counter[str] = Counter()
    for batch in mine:
        work = job.work(batch)
        store.extend([record.to_json() for record in work.records])
        counts.update(work.counts)
        bar.advance(work.items, work.tokens)
    bar.close()
    totals = _totals(workers, bar, {name: counts[name] for name in job.count_names})
    merge_parts(folder, workers)
    records = job.folder.read_records() if workers.is_main else []
    return JobResult(records, totals)


def _totals(workers: Workers, bar: ThroughputBar, counts: dict[str, int]) -> JobTotals:
    mine = JobTotals(tokens=bar.tokens, seconds=bar.seconds, items=bar.items, counts=counts)
    parts: list[JobTotals] = workers.gather(mine)
    return JobTotals(
        items=sum(part.items for part in parts),
        tokens=sum(part.tokens for part in parts),
        seconds=max(part.seconds for part in parts),
        counts={name: sum(part.counts[name] for part in parts) for name in counts},
    )


def part_path(path: Path, rank: int) -> Path:
    """The part file of process `rank` for the store `path`: `parts/<stem>.<rank><suffix>` beside it."""
    return path.parent / "parts" / f"{path.stem}.{rank}{path.suffix}"


def open_store(folder: RunFolder, workers: Workers) -> tuple[RecordStore, list[dict[str, Any]]]:
    """The store this process appends to, and the records written by any process in an earlier run (each holding
    the folder's required fields, else a [`StoreError`] naming the file and line).

    Each file is repaired (a partial last line dropped) only by the process that writes it: the main store by the
    main process, before the others read it; a part by its own process. Other files are only read, and nobody
    appends until every process has read.
    """
    path = folder.records_path
    if workers.is_main:
        folder.store()
    workers.wait()
    own = folder.store(path if workers.world == 1 else part_path(path, workers.rank))
    done = []
    for other in [path, *sorted(path.parent.glob(f"parts/{path.stem}.*{path.suffix}"))]:
        done += read_jsonl(other, folder.required_fields, partial_tail=True)
    workers.wait()
    return own, done


def merge_parts(folder: RunFolder, workers: Workers) -> None:
    """After every process has finished: the main process appends the parts' new records to the main store and
    removes the parts. Safe to repeat after an interruption (records already merged are skipped)."""
    workers.wait()
    if workers.is_main:
        path = folder.records_path
        main = folder.store()
        for part in sorted(path.parent.glob(f"parts/{path.stem}.*{path.suffix}")):
            main.extend(folder.store(part).records())
            part.unlink()
    workers.wait()

