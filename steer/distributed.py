"""Sharing work among processes started by `accelerate launch` (GPUs) or `torchrun` (several CPU processes, which
`accelerate launch` starts only through MPI), and merging what they wrote.

Each process takes every `world`-th batch of the work list, appends its records to its own part file, and the main
process merges the parts into the one store a single process would have written. A single process (no launcher)
writes the store directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import PartialState

from steer.progress import ThroughputBar
from steer.store import RecordStore, read_jsonl

T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes sharing a job.

    Attributes:
        rank (`int`): this process's index, 0 for the main process.
        world (`int`): number of processes.
        device (`torch.device`): the device this process should use.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items`: every `world`-th one, starting at `rank`."""
        return list(items[self.rank :: self.world])

    def gather(self, value: T) -> list[T]:
        """`value` from every process, in rank order; every process must call it (one element for one process)."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def wait(self) -> None:
        """Block until every process gets here (a no-op for a single process)."""
        if self.world > 1:
            PartialState().wait_for_everyone()


def current_workers(cpu: bool = False) -> Workers:
    """The workers of this run: from `accelerate launch` or `torchrun` if one started us, else a single process.

    Args:
        cpu (`bool`, defaults to `False`): use the CPU even where a GPU is available.
    """
    state = PartialState(cpu=cpu)
    return Workers(rank=state.process_index, world=state.num_processes, device=state.device)


def job_totals(workers: Workers, bar: ThroughputBar, **extra: int) -> dict[str, float]:
    """The whole job's counts: items, tokens and `extra` counts summed over the processes, and the seconds of the
    slowest one. Every process must call it."""
    parts = workers.gather({"items": bar.items, "tokens": bar.tokens, "seconds": bar.seconds, **extra})
    totals = {name: sum(part[name] for part in parts) for name in parts[0]}
    totals["seconds"] = max(part["seconds"] for part in parts)
    return totals


def part_path(path: Path, rank: int) -> Path:
    return path.parent / "parts" / f"{path.stem}.{rank}{path.suffix}"


def open_store(path: Path, key_fields: tuple[str, ...], workers: Workers) -> tuple[RecordStore, list[dict]]:
    """The store this process appends to, and the records written by any process in an earlier run.

    Each file is repaired (a partial last line dropped) only by the process that writes it: the main store by the
    main process, before the others read it; a part by its own process. Other files are only read, and nobody
    appends until every process has read.
    """
    if workers.is_main:
        RecordStore(path, key_fields)
    workers.wait()
    own = RecordStore(path if workers.world == 1 else part_path(path, workers.rank), key_fields)
    done = []
    for other in [path, *sorted(path.parent.glob(f"parts/{path.stem}.*{path.suffix}"))]:
        done += read_jsonl(other, key_fields, partial_tail=True)
    workers.wait()
    return own, done


def merge_parts(path: Path, key_fields: tuple[str, ...], workers: Workers) -> None:
    """After every process has finished: the main process appends the parts' new records to the main store and
    removes the parts. Safe to repeat after an interruption (records already merged are skipped)."""
    workers.wait()
    if workers.is_main:
        main = RecordStore(path, key_fields)
        for part in sorted(path.parent.glob(f"parts/{path.stem}.*{path.suffix}")):
            main.extend(RecordStore(part, key_fields).records())
            part.unlink()
    workers.wait()
