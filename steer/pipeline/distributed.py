"""This process's place among the processes started by `accelerate launch` (GPUs) or `torchrun` (several CPU
processes, which `accelerate launch` starts only through MPI): its rank, the number of processes, and its device.
How a job's work is shared among them is :mod:`steer.pipeline.jobs`'s business."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from accelerate import PartialState

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
