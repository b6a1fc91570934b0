"""A read-only Triton kernel: the least work a per-step kernel over the logits can do, for benchmarks.

It reads every entry of each row once, split over programs and tiled like the fused kernel (same launch
configuration), keeps a per-lane maximum and writes one number per program. Its time is the roofline the fused step
is measured against: both move the same bytes (one read of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from steer.kernels.fused_steer import LAUNCH_CONFIGS, chunking


@triton.jit(do_not_specialize=["chunk_tiles"])
def _read_kernel(logits_ptr, out_ptr, vocab, stride, chunk_tiles, BLOCK: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1)
    begin = split * chunk_tiles * BLOCK
    end = tl.minimum(begin + chunk_tiles * BLOCK, vocab)
    row_logits = logits_ptr + row.to(tl.int64) * stride
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_logits + cols, mask=cols < end, other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(out_ptr + row * tl.num_programs(0) + split, tl.max(acc, axis=0))


@dataclass(frozen=True)
class Specialization:
    """The read kernel's variant for one logits dtype, on aligned rows (what the benchmark passes)."""

    logits: torch.dtype
    block: int
    num_warps: int

    @property
    def name(self) -> str:
        short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        return f"read-{short[self.logits]}-aligned-b{self.block}w{self.num_warps}"


def specializations() -> list[Specialization]:
    return [Specialization(dtype, config.block, config.num_warps) for dtype, config in LAUNCH_CONFIGS.items()]


def compile_source(spec: Specialization) -> tuple[triton.runtime.JITFunction, dict, dict, dict]:
    """`(kernel, signature, constexprs, attrs)` for `triton.compile(ASTSource(...))`, as in `fused_steer`."""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    signature = {"logits_ptr": "*" + short[spec.logits], "out_ptr": "*fp32", "vocab": "i32", "stride": "i32",
                 "chunk_tiles": "i32", "BLOCK": "constexpr"}
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(4)}
    return _read_kernel, signature, {"BLOCK": spec.block}, attrs


def read_rows(logits: torch.Tensor, splits: int) -> torch.Tensor:
    """Read `logits` `[B, V]` once with `splits` programs per row; returns each program's maximum `[B, splits]`."""
    batch, vocab = logits.shape
    config = LAUNCH_CONFIGS[logits.dtype]
    splits, chunk_tiles = chunking(vocab, splits, config.block)
    out = torch.empty(batch, splits, device=logits.device, dtype=torch.float32)
    _read_kernel[(splits, batch)](logits, out, vocab, logits.stride(0), chunk_tiles, BLOCK=config.block,
                                  num_warps=config.num_warps)
    return out
