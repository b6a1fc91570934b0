"""The functional API of the per-step decoding math, and the single place that picks its implementation.

Everything that computes decoding-step entropy, top-k or the steering adjustment goes through these functions. They
dispatch to the fused Triton kernel (:mod:`steer.kernels.fused_steer`) for CUDA tensors and to the PyTorch reference
(:mod:`steer.reference`) elsewhere. The environment variable `STEER_KERNEL` overrides the choice:

- `auto` (default): Triton on CUDA when it is installed and the kernel serves the call (k at most
  `steer.kernels.limits.MAX_K`, a dtype pair in `steer.kernels.limits.WEIGHT_DTYPES`), PyTorch otherwise;
- `triton`: always the kernel; on the CPU this needs Triton's interpreter (`TRITON_INTERPRET=1`, set before the
  first call), which is exact but slow, for tests;
- `torch`: always the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from steer import reference
from steer.kernels.limits import MAX_K, kernel_serves
from steer.reference import EntropyTopK, SteeredLogits

KERNEL_ENV = "STEER_KERNEL"
KERNEL_CHOICES = ("auto", "triton", "torch")


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


def kernel_path(
    device: torch.device | str,
    k: int = 1,
    dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
) -> str:
    """`"triton"` or `"torch"`: the implementation that a step on `device` with `k` candidates, logits of `dtype`
    and (when steering) an output embedding of `weight_dtype` uses.

    Raises:
        `ValueError`: `STEER_KERNEL=triton` where the kernel cannot run (no Triton; a CPU device without the
            interpreter; k above `MAX_K`; a dtype pair it does not serve).
    """
    device = torch.device(device)
    choice = kernel_choice()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        served = device.type == "cuda" and triton_available() and kernel_serves(dtype, k, weight_dtype)
        return "triton" if served else "torch"
    if not triton_available():
        raise ValueError(f"{KERNEL_ENV}=triton, but Triton is not installed")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{KERNEL_ENV}=triton on a {device.type} tensor needs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before the first steering call")
    if k > MAX_K:
        raise ValueError(f"{KERNEL_ENV}=triton: the kernel supports k up to {MAX_K}; got k={k}")
    if not kernel_serves(dtype, k, weight_dtype):
        raise ValueError(f"{KERNEL_ENV}=triton: the kernel does not serve {dtype} logits with a {weight_dtype} "
                         "output embedding")
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
    if kernel_path(logits.device, k, logits.dtype) == "triton":
        from steer.kernels import fused_steer

        return fused_steer.entropy_topk(logits, k)
    return reference.entropy_topk(logits, k)


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
    *,
    inplace: bool = False,
) -> SteeredLogits:
    """Add the head's correction to the top-k logits of rows whose base entropy exceeds `tau`.

    See [`steer.reference.steer_logits`] for shapes, dtypes and an example. By default the input is not modified and
    the result's `logits` is a new tensor; with `inplace=True` the k entries of each gated row are adjusted in
    `logits` itself, which is then the result's `logits` (what a decoding loop wants: no copy of the scores).
    """
    if kernel_path(logits.device, k, logits.dtype, output_embedding.dtype) == "triton":
        from steer.kernels import fused_steer

        return fused_steer.steer_logits(logits, correction, output_embedding, k, tau, inplace=inplace)
    return reference.steer_logits(logits, correction, output_embedding, k, tau, inplace=inplace)
