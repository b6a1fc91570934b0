"""The fused kernel's limits, importable without Triton.

`steer.functional` reads these to decide whether the kernel can serve a call; the kernel module
(:mod:`steer.kernels.fused_steer`) owns the kernel and enforces them. Keeping them here lets `import steer` stay free
of Triton.
"""

from __future__ import annotations

import torch

MAX_K = 16  # the largest k: candidates live in a register vector of next_power_of_2(k) slots

# Logit dtypes the kernel reads, and for each the output-embedding dtypes it steers with. A decoding loop hands the
# processor float32 scores whatever the model's dtype; a caller of `steer_logits` usually passes matching dtypes.
# Other pairs take the PyTorch path.
WEIGHT_DTYPES: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.bfloat16: (torch.bfloat16,),
    torch.float16: (torch.float16,),
    torch.float32: (torch.float32, torch.bfloat16, torch.float16),
}


def kernel_serves(logits_dtype: torch.dtype, k: int, weight_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel handles logits of `logits_dtype` with `k` candidates (and, when steering, an output
    embedding of `weight_dtype`)."""
    weights = WEIGHT_DTYPES.get(logits_dtype)
    return weights is not None and 1 <= k <= MAX_K and (weight_dtype is None or weight_dtype in weights)
