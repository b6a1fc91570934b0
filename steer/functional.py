"""The functional API of the per-step decoding math, and the single place that picks its implementation.

Everything that computes decoding-step entropy, top-k or the steering adjustment goes through these functions. They
dispatch to the fused Triton kernel (:mod:`steer.kernels.fused_steer`) for CUDA tensors and to the PyTorch reference
(:mod:`steer.reference`) elsewhere. The environment variable `STEER_KERNEL` overrides the choice:

- `auto` (default): Triton on CUDA when it is installed and k is at most 16, PyTorch otherwise;
- `triton`: always the kernel; on the CPU this needs Triton's interpreter (`TRITON_INTERPRET=1`, set before the
  first call), which is exact but slow, for tests;
- `torch`: always the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from steer import reference
from steer.reference import EntropyTopK, SteeredLogits

KERNEL_ENV = "STEER_KERNEL"
KERNEL_CHOICES = ("auto", "triton", "torch")
TRITON_MAX_K = 16  # the kernel's largest k; `steer.kernels.fused_steer.MAX_K`


def triton_available() -> bool:
    """Whether Triton is installed (it ships for Linux on x86-64 and aarch64)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_choice() -> str:
    """The value of `STEER_KERNEL` (default `auto`), checked."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r} is not one of {', '.join(KERNEL_CHOICES)}")
    return choice


def kernel_path(device: torch.device | str, k: int = 1) -> str:
    """`"triton"` or `"torch"`: the implementation that a step on `device` with `k` candidates uses.

    Raises:
        `ValueError`: `STEER_KERNEL=triton` where the kernel cannot run (no Triton; a CPU device without the
            interpreter; k above 16).
    """
    device = torch.device(device)
    choice = kernel_choice()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() and k <= TRITON_MAX_K else "torch"
    if not triton_available():
        raise ValueError(f"{KERNEL_ENV}=triton, but Triton is not installed")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{KERNEL_ENV}=triton on a {device.type} tensor needs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before the first steering call")
    if k > TRITON_MAX_K:
        raise ValueError(f"{KERNEL_ENV}=triton: the kernel supports k up to {TRITON_MAX_K}; got k={k}")
    return "triton"


def active_kernel() -> str:
    """What `steer info` reports: the path a step on the default device takes, e.g. `"triton (cuda)"`,
    `"triton (interpreter)"` or `"torch"`, or why the forced path cannot run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = kernel_path(device)
    except ValueError as err:
        return f"unavailable: {err}"
    if path == "torch":
        return "torch"
    return "triton (cuda)" if device.type == "cuda" else "triton (interpreter)"


def entropy_topk(logits: torch.Tensor, k: int) -> EntropyTopK:
    """Entropy (nats, float32) of `softmax(logits)` and the top-k candidates of each row.

    See [`steer.reference.entropy_topk`] for shapes, dtypes and the behaviour on `-inf` and NaN; the Triton path
    returns the same (among tied values it picks the smaller index).

    Example:

    ```python
    >>> import torch, steer
    >>> entropy, values, indices = steer.entropy_topk(torch.randn(4, 1000), k=5)
    >>> entropy.shape, values.shape, indices.dtype
    (torch.Size([4]), torch.Size([4, 5]), torch.int64)
    ```
    """
    if kernel_path(logits.device, k) == "triton":
        from steer.kernels import fused_steer

        return fused_steer.entropy_topk(logits, k)
    return reference.entropy_topk(logits, k)


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
) -> SteeredLogits:
    """Add the head's correction to the top-k logits of rows whose base entropy exceeds `tau`.

    See [`steer.reference.steer_logits`] for shapes, dtypes and an example. The input is not modified.
    """
    if kernel_path(logits.device, k) == "triton":
        from steer.kernels import fused_steer

        return fused_steer.steer_logits(logits, correction, output_embedding, k, tau)
    return reference.steer_logits(logits, correction, output_embedding, k, tau)
