"""Progress of long runs: a bar that counts items and shows tokens per second, and the throughput a stage
reports."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Throughput:
    """`tokens` generated or scored in `seconds`: the base of every stage's summary."""

    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ThroughputBar:
    """A progress bar over items (sequences, rollouts) that shows tokens per second, and keeps the counts.

    Args:
        total (`int`): items expected.
        desc (`str`): the bar's label.
        unit (`str`): what an item is.
        enabled (`bool`): draw the bar (counting happens either way).

    Example:

    ```python
    >>> bar = ThroughputBar(total=2, desc="decode", unit="seq", enabled=False)
    >>> bar.advance(items=2, tokens=30)
    >>> bar.tokens
    30
    ```
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool) -> None:
        self.items = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self._bar = tqdm(total=total, unit=unit, desc=desc, disable=not enabled)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def advance(self, items: int, tokens: int) -> None:
        self.items += items
        self.tokens += tokens
        self._bar.update(items)
        self._bar.set_postfix(tok_s=f"{self.tokens_per_second:.1f}")

    def close(self) -> None:
        self._bar.close()
