"""The functional API of the per-step decoding math, and the single place that picks its implementation.

Everything that computes decoding-step entropy, top-k or the steering adjustment goes through these functions, so
the CPU path and the reference (:mod:`steer.reference`) stay one and the same.
"""

from __future__ import annotations

import torch

from steer import reference
from steer.reference import EntropyTopK, SteeredLogits


def entropy_topk(logits: torch.Tensor, k: int) -> EntropyTopK:
    """Entropy (nats, float32) of `softmax(logits)` and the top-k candidates of each row.

    See [`steer.reference.entropy_topk`] for shapes, dtypes and the behaviour on `-inf` and NaN.

    Example:

    ```python
    >>> import torch, steer
    >>> entropy, values, indices = steer.entropy_topk(torch.randn(4, 1000), k=5)
    >>> entropy.shape, values.shape, indices.dtype
    (torch.Size([4]), torch.Size([4, 5]), torch.int64)
    ```
    """
    return reference.entropy_topk(logits, k)


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
) -> SteeredLogits:
    """Add the head's correction to the top-k logits of rows whose base entropy exceeds `tau`.

    See [`steer.reference.steer_logits`] for shapes, dtypes and an example.
    """
    return reference.steer_logits(logits, correction, output_embedding, k, tau)
