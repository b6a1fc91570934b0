"""Refusing transformers' continuous batching on a model that a steering processor is attached to.

Continuous batching (`model.generate_batch`, `model.init_continuous_batching`,
`model.continuous_batching_context_manager`, and `model.generate(..., cache_implementation="paged")`, which calls
`generate_batch`) builds its logits processors from the generation config alone: a `logits_processor` argument is
ignored, so a [`SteeringProcessor`] would never run and the model would decode unsteered. All these entry points go
through `model.init_continuous_batching`, so while a processor is attached, [`refuse_continuous_batching`] shadows
that method on the model instance with one that raises [`SteeringError`]; closing the last processor restores it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from steer.errors import SteeringError

ENTRY_POINT = "init_continuous_batching"


def refuse_continuous_batching(model: nn.Module) -> Callable[[], None]:
    """Make `model.init_continuous_batching` (and so every continuous-batching entry point) raise `SteeringError`
    until the returned function is called. Nested calls on the same model count: the method comes back when the
    last one is released. The release function is idempotent.

    Args:
        model (`PreTrainedModel`): the model a steering processor is attached to.

    Returns:
        `Callable[[], None]`: the release function.

    Example:

    ```python
    >>> release = refuse_continuous_batching(model)  # doctest: +SKIP
    >>> model.generate_batch([[5, 6, 7]])  # doctest: +SKIP
    SteeringError: a steering processor is attached to this model; continuous batching would decode unsteered ...
    >>> release()  # doctest: +SKIP
    ```
    """
    if not hasattr(model, ENTRY_POINT):
        return lambda: None
    guard = model.__dict__.get(ENTRY_POINT)
    if not isinstance(guard, _Refusal):
        guard = _Refusal()
        object.__setattr__(model, ENTRY_POINT, guard)
    guard.holders += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        guard.holders -= 1
        if guard.holders == 0 and model.__dict__.get(ENTRY_POINT) is guard:
            del model.__dict__[ENTRY_POINT]

    return release


class _Refusal:
    """Stands in for `init_continuous_batching` while steering processors are attached (`holders` of them)."""

    def __init__(self) -> None:
        self.holders = 0

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise SteeringError(
            "a steering processor is attached to this model, and continuous batching (generate_batch, "
            "init_continuous_batching, or generate(cache_implementation='paged')) runs only transformers' own logits "
            "processors, so it would decode unsteered; use model.generate with the processor (or steer.generate), or "
            "close the processor to batch without steering"
        )
