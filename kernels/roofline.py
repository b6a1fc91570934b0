"""A read-only Triton kernel: the least work a per-step kernel over the logits can do, for benchmarks.

It reads every entry of each row once (split over programs like the fused kernel) and writes one number per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.kernels.fused_steer import chunking


@triton.jit
def _read_kernel(logits_ptr, out_ptr, vocab, stride, chunk, BLOCK: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1)
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride + cols, mask=cols < end, other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(out_ptr + row * tl.num_programs(0) + split, tl.max(acc, axis=0))


def read_rows(logits: torch.Tensor, splits: int, block: int = 1024) -> torch.Tensor:
    """Read `logits` `[B, V]` once with `splits` programs per row; returns each program's maximum `[B, splits]`."""
    batch, vocab = logits.shape
    splits, chunk = chunking(vocab, splits, block)
    out = torch.empty(batch, splits, device=logits.device, dtype=torch.float32)
    _read_kernel[(splits, batch)](logits, out, vocab, logits.stride(0), chunk, BLOCK=block)
    return out
