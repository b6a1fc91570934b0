"""One Triton launch per decoding step: entropy, top-k and the steering adjustment in one read of the logits.

Grid `(splits, B)`: each row is split over `splits` programs so that small batches still fill the GPU. A program
sweeps its chunk of the row once, in tiles of `BLOCK` entries, and per tile does one block-wide reduction (the tile's
maximum). That maximum serves twice:

- **entropy**: the online softmax statistics are kept in `LANES` per-lane accumulators (each thread folds its own
  entries onto them), relative to the chunk's running maximum `m`: `d = sum 2^z` and `t = sum z 2^z` with
  `z = (x - m) log2(e)`, one exponential per entry; the lanes are summed once, after the sweep. When the maximum
  grows, the lanes are rescaled (rare after the first tiles).
- **top-k**: the program keeps its best k entries as 64-bit keys (the float's bits mapped to an integer of the same
  order in the high half, `0xFFFFFFFF - column` in the low half, so ties go to the smaller column). A tile whose
  largest possible key does not beat the k-th best is skipped; otherwise it is read again (from L1) in sub-tiles of
  `SUB` entries, whose keys are taken largest first while they beat the k-th best (`_absorb`): one reduction per
  accepted candidate, no sort of the tile, and no 64-bit keys held across the sweep.

Each program then stores its partial statistics and keys and takes a ticket from a per-row atomic counter; the
program that takes the last ticket resets the counter (so a CUDA graph can replay the launch) and finishes the row:
merges the partials into log-sum-exp and entropy (`log d - t / d`, in nats), merges the keys into the row's top-k,
and, where the entropy exceeds `tau`, adds the head's correction `<W[idx_j], c>` to the k logits, in place. Nothing
else of the row is read or written again, and the host never waits for the GPU.

NaN and `-inf` follow :mod:`steer.reference`: `-inf` entries add nothing; a row with a NaN, or of only `-inf`, gets
NaN entropy and is never gated (its top-k is unspecified).

Every variant this module can launch is listed by :func:`specializations`, which the compile check
(:mod:`steer.kernels.compile_check`) builds ahead of time for each GPU architecture.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from steer.kernels.limits import MAX_K, WEIGHT_DTYPES, kernel_serves
from steer.reference import EntropyTopK, SteeredLogits, check_logits

__all__ = ["MAX_K", "entropy_topk", "steer_logits", "specializations", "Specialization"]

PROGRAMS_PER_SM = 4  # target of the split: this many programs per streaming multiprocessor over the batch
SLOTS = tl.constexpr(MAX_K)  # width of the top-k register vector, whatever k: one compiled variant serves every k
assert MAX_K & (MAX_K - 1) == 0, "the top-k vector is sorted with tl.sort, which needs a power of two"
SPLIT_GROUP = tl.constexpr(16)  # partials merged per step by the row's last program
HIDDEN_BLOCK = tl.constexpr(128)  # columns of the output embedding read per step of the correction's dot products


@dataclass(frozen=True)
class LaunchConfig:
    """How a tile is cut: `block` entries per tile over `num_warps` warps, softmax sums kept in `lanes` per-lane
    accumulators (a tile is folded onto them inside each thread), top-k candidates re-read in sub-tiles of `sub`."""

    block: int
    num_warps: int
    lanes: int
    sub: int

    def with_block(self, block: int) -> LaunchConfig:
        """The same configuration on tiles of `block` entries (tests and benchmarks)."""
        return LaunchConfig(block, self.num_warps, min(self.lanes, block), min(self.sub, block))


# 16 entries per thread and tile, 8 per lane accumulator: about 80 registers without spills on sm_80 and sm_90, so
# three programs fit on a streaming multiprocessor, each with a tile's loads in flight (24 KB at 2 bytes an entry).
_CONFIG = LaunchConfig(block=4096, num_warps=8, lanes=2048, sub=1024)
LAUNCH_CONFIGS: dict[torch.dtype, LaunchConfig] = {dtype: _CONFIG for dtype in WEIGHT_DTYPES}

_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_Z_FLOOR = tl.constexpr(-1.0e4)  # z (base 2) below this has 2^z = 0 in float32; clamping keeps z 2^z finite


@triton.jit
def _row_offset(row, stride):
    """`row * stride` in int64: a row-strided view (`logits[:, -1, :]` of `[B, T, V]`) passes 2^31 quickly."""
    return row.to(tl.int64) * stride


@triton.jit
def _ordered_keys(x, cols):
    """int64 keys whose order is the order of the float32 values `x`, ties broken towards the smaller column."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 and 0.0 are one value
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (0xFFFFFFFF - tl.cast(cols, tl.int64))  # cols may be a loop's int


@triton.jit
def _key_values(keys):
    """The float32 values of keys made by `_ordered_keys`."""
    ordered = (keys >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_columns(keys):
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


@triton.jit
def _absorb(best, floor, keys):
    """Move the keys that beat `floor` (the smallest of `best`) into `best`, largest first, each replacing the
    smallest. Keys are distinct, so the slot to replace is the one equal to `floor`. Returns `(best, floor)`."""
    top = tl.max(keys, axis=0)
    while top > floor:
        best = tl.where(best == floor, top, best)
        keys = tl.where(keys == top, _KEY_MIN, keys)
        floor = tl.min(best, axis=0)
        top = tl.max(keys, axis=0)
    return best, floor


@triton.jit
def _fold(x, BLOCK: tl.constexpr, LANES: tl.constexpr):
    """Sum `x` [BLOCK] onto [LANES] accumulators; entries folded together live in one thread: no barrier."""
    return tl.sum(tl.reshape(x, [BLOCK // LANES, LANES]), axis=0)


@triton.jit
def _rescaled(d, t, shift, new_shift, live):
    """`(d, t)` kept relative to a maximum whose base-2 log is `shift`, re-expressed relative to `new_shift >= shift`.
    `live` is False while nothing finite was seen (then d = t = 0 and the scale may overflow)."""
    step = shift - new_shift
    scale = tl.where(live, tl.exp2(step), 0.0)
    return scale * d, scale * (t + d * step)


def _steer(
    logits_ptr, keys_ptr, stats_ptr, ticket_ptr, correction_ptr, weight_ptr,
    entropy_ptr, values_ptr, indices_ptr, flags_ptr,
    vocab, stride_logits, chunk_tiles, k, hidden, stride_correction, stride_weight, tau,
    BLOCK: tl.constexpr, LANES: tl.constexpr, SUB: tl.constexpr, STEER: tl.constexpr,
):
    """The whole step; jitted twice below (for 16-byte-aligned rows and for any rows)."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    splits = tl.num_programs(0)
    rows = tl.num_programs(1)
    chunk = chunk_tiles * BLOCK
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    row_logits = logits_ptr + _row_offset(row, stride_logits)
    lanes = tl.arange(0, BLOCK)
    slots = tl.arange(0, SLOTS)
    active = slots < k

    # Sweep: per-lane softmax statistics relative to the running maximum m (shift = m log2 e), and the top-k.
    m = tl.full([], float("-inf"), tl.float32)
    shift = tl.zeros([], tl.float32)
    d = tl.zeros([LANES], tl.float32)
    t = tl.zeros([LANES], tl.float32)
    best = tl.where(active, _KEY_MIN + slots.to(tl.int64), _KEY_MAX)  # distinct placeholders below every real key
    floor = tl.min(best, axis=0)
    for start in range(begin, end, BLOCK):
        cols = start + lanes
        inside = cols < end
        x = tl.load(row_logits + cols, mask=inside, other=float("-inf")).to(tl.float32)
        top = tl.max(x, axis=0)
        if top > m:
            new_shift = top * _LOG2E
            d, t = _rescaled(d, t, shift, new_shift, m > float("-inf"))
            m = top
            shift = new_shift
        z = x * _LOG2E - shift
        e = tl.exp2(z)
        d += _fold(e, BLOCK, LANES)
        t += _fold(tl.maximum(z, _Z_FLOOR) * e, BLOCK, LANES)  # -inf: z 2^z = 0, not NaN; NaN still poisons d
        if _ordered_keys(top, start) > floor:  # the largest key this tile could hold
            # Rare after the first tiles. Re-read the tile (from L1) in sub-tiles rather than keep it live, so that
            # the 64-bit keys do not set the kernel's register count.
            for first in range(start, tl.minimum(start + BLOCK, end), SUB):
                sub_cols = first + tl.arange(0, SUB)
                sub_inside = sub_cols < end
                sub_x = tl.load(row_logits + sub_cols, mask=sub_inside, other=float("-inf")).to(tl.float32)
                best, floor = _absorb(best, floor, tl.where(sub_inside, _ordered_keys(sub_x, sub_cols), _KEY_MIN))

    slot = row * splits + split
    tl.store(stats_ptr + 3 * slot, m)
    tl.store(stats_ptr + 3 * slot + 1, tl.sum(d, axis=0))
    tl.store(stats_ptr + 3 * slot + 2, tl.sum(t, axis=0))
    tl.store(keys_ptr + slot * SLOTS + slots, best)

    # The last program of the row to arrive finishes it. The barrier orders every thread's stores before the
    # release of the ticket; the acquire makes the other programs' partials visible.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == splits - 1:
        tl.atomic_xchg(ticket_ptr + row, 0, sem="relaxed", scope="gpu")
        m = tl.full([], float("-inf"), tl.float32)
        shift = tl.zeros([], tl.float32)
        d_row = tl.zeros([], tl.float32)
        t_row = tl.zeros([], tl.float32)
        best = tl.where(active, _KEY_MIN + slots.to(tl.int64), _KEY_MAX)
        floor = tl.min(best, axis=0)
        group = tl.arange(0, SPLIT_GROUP)
        for first in range(0, splits, SPLIT_GROUP):
            present = first + group < splits
            partial = row * splits + first + group
            ms = tl.load(stats_ptr + 3 * partial, mask=present, other=float("-inf"), cache_modifier=".cg")
            ds = tl.load(stats_ptr + 3 * partial + 1, mask=present, other=0.0, cache_modifier=".cg")
            ts = tl.load(stats_ptr + 3 * partial + 2, mask=present, other=0.0, cache_modifier=".cg")
            top = tl.max(ms, axis=0)
            if top > m:
                new_shift = top * _LOG2E
                d_row, t_row = _rescaled(d_row, t_row, shift, new_shift, m > float("-inf"))
                m = top
                shift = new_shift
            empty = ds == 0.0  # only -inf seen; NaN is not empty and propagates
            step = tl.where(empty, 0.0, ms * _LOG2E - shift)  # each partial's own maximum against the row's
            scale = tl.exp2(step)
            d_row += tl.sum(tl.where(empty, 0.0, scale * ds), axis=0)
            t_row += tl.sum(tl.where(empty, 0.0, scale * (ts + ds * step)), axis=0)
            keys = tl.load(keys_ptr + partial[:, None] * SLOTS + slots[None, :],
                           mask=present[:, None] & active[None, :], other=_KEY_MIN, cache_modifier=".cg")
            best, floor = _absorb(best, floor, tl.reshape(keys, [SPLIT_GROUP * SLOTS]))
        entropy = tl.log(d_row) - _LN2 * t_row / d_row
        best = tl.sort(tl.where(active, best, _KEY_MIN), descending=True)
        values = _key_values(best)
        columns = _key_columns(best)
        tl.store(entropy_ptr + row, entropy)
        tl.store(indices_ptr + row * k + slots, columns, mask=active)
        if STEER:
            gated = entropy > tau  # False for NaN
            delta = tl.zeros([SLOTS], tl.float32)
            changed = tl.zeros([], tl.int1)
            if gated:
                row_correction = correction_ptr + _row_offset(row, stride_correction)
                for first_dim in range(0, hidden, HIDDEN_BLOCK):
                    dims = first_dim + tl.arange(0, HIDDEN_BLOCK)
                    inside = dims < hidden
                    c = tl.load(row_correction + dims, mask=inside, other=0.0).to(tl.float32)
                    w = tl.load(weight_ptr + columns[:, None] * stride_weight + dims[None, :],
                                mask=active[:, None] & inside[None, :], other=0.0).to(tl.float32)
                    delta += tl.sum(w * c[None, :], axis=1)
                # centred over the k candidates: the head re-ranks them, it does not move them together
                delta = tl.where(active, delta - tl.sum(tl.where(active, delta, 0.0), axis=0) / k, 0.0)
                adjusted = values + delta
                tl.store(row_logits + columns, adjusted.to(logits_ptr.dtype.element_ty), mask=active)
                base_top = tl.sum(tl.where(slots == 0, adjusted, 0.0), axis=0)
                changed = tl.max(tl.where((slots > 0) & active, adjusted, float("-inf")), axis=0) > base_top
            tl.store(values_ptr + row * k + slots, delta, mask=active)
            tl.store(flags_ptr + row, gated)
            tl.store(flags_ptr + rows + row, changed)
        else:
            tl.store(values_ptr + row * k + slots, values, mask=active)


# Every integer argument is exempt from Triton's value specialisation (divisible by 16, equal to 1), and so are the
# pointers whose alignment the launcher cannot promise, so that the variants launched are exactly those that
# `specializations` lists. Rows that are 16-byte aligned (base pointer, row stride and vocabulary size) take
# `_steer_aligned`, where those three are specialised and loads are vectorised; other rows take `_steer_any`.
_INTS = ["chunk_tiles", "k", "hidden", "stride_correction", "stride_weight"]
_UNALIGNED_POINTERS = ["correction_ptr", "weight_ptr"]
_steer_aligned = triton.jit(_steer, do_not_specialize=_INTS, do_not_specialize_on_alignment=_UNALIGNED_POINTERS)
_steer_any = triton.jit(_steer, do_not_specialize=[*_INTS, "vocab", "stride_logits"],
                        do_not_specialize_on_alignment=[*_UNALIGNED_POINTERS, "logits_ptr"])


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of the kernel: what the launcher picks from the dtypes, k and the rows' alignment."""

    logits: torch.dtype
    weight: torch.dtype | None  # None: statistics and top-k only (`entropy_topk`)
    aligned: bool
    config: LaunchConfig

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def name(self) -> str:
        short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        steer = f"steer-{short[self.weight]}" if self.weight is not None else "stats"
        layout = "aligned" if self.aligned else "any"
        tile = f"b{self.config.block}w{self.config.num_warps}"
        return f"{short[self.logits]}-{steer}-{layout}-{tile}"


def specialization(logits: torch.dtype, weight: torch.dtype | None, aligned: bool) -> Specialization:
    """The variant that a call with these dtypes and row alignment launches (any k: k is a runtime argument)."""
    return Specialization(logits, weight, aligned, LAUNCH_CONFIGS[logits])


def specializations() -> list[Specialization]:
    """Every variant the launcher can pick: each logits dtype, steering off or on with each weight dtype it serves,
    aligned rows or not, each with its launch configuration."""
    return [
        specialization(logits, weight, aligned)
        for logits in LAUNCH_CONFIGS
        for weight in (None, *WEIGHT_DTYPES[logits])
        for aligned in (True, False)
    ]


def compile_source(spec: Specialization) -> tuple[triton.runtime.JITFunction, dict, dict, dict]:
    """`(kernel, signature, constexprs, attrs)` for `triton.compile(ASTSource(...))`: the jitted kernel that `spec`
    launches, with the argument types and the 16-byte divisibility that the launcher's arguments give it."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    logits = "*" + names[spec.logits]
    weight = "*" + names[spec.weight] if spec.weight is not None else "*fp32"  # statistics pass a float32 placeholder
    signature = {
        "logits_ptr": logits, "keys_ptr": "*i64", "stats_ptr": "*fp32", "ticket_ptr": "*i32",
        "correction_ptr": "*fp32", "weight_ptr": weight, "entropy_ptr": "*fp32", "values_ptr": "*fp32",
        "indices_ptr": "*i64", "flags_ptr": "*i1" if spec.weight is not None else "*fp32",
        "vocab": "i32", "stride_logits": "i32", "chunk_tiles": "i32", "k": "i32", "hidden": "i32",
        "stride_correction": "i32", "stride_weight": "i32", "tau": "fp32",
        "BLOCK": "constexpr", "LANES": "constexpr", "SUB": "constexpr", "STEER": "constexpr",
    }
    config = spec.config
    constexprs = {"BLOCK": config.block, "LANES": config.lanes, "SUB": config.sub, "STEER": spec.weight is not None}
    divisible = ["keys_ptr", "stats_ptr", "ticket_ptr", "entropy_ptr", "values_ptr", "indices_ptr", "flags_ptr"]
    if spec.aligned:
        divisible += ["logits_ptr", "vocab", "stride_logits"]
    order = list(signature)
    attrs = {(order.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return jitted(spec.aligned), signature, constexprs, attrs


def jitted(aligned: bool) -> triton.runtime.JITFunction:
    return _steer_aligned if aligned else _steer_any


def default_splits(batch: int, vocab: int, block: int, device: torch.device) -> int:
    """Programs per row: enough that the batch fills the device, at most one per tile."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: splitting buys nothing but is still exercised
        target = 2
    return max(1, min(triton.cdiv(vocab, block), triton.cdiv(target, batch)))


def chunking(vocab: int, splits: int, block: int) -> tuple[int, int]:
    """`(splits, chunk_tiles)`: chunks of a whole number of tiles covering the row; `splits` shrinks if tiles run
    out, so that no program is empty."""
    tiles = triton.cdiv(triton.cdiv(vocab, splits), block)
    return triton.cdiv(vocab, tiles * block), tiles


def device_guard(device: torch.device):
    """A context that makes `device` current for a launch: Triton launches on the current CUDA device, which is not
    the logits' device when a model is split over GPUs."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}


def _ticket_counters(device: torch.device, batch: int) -> torch.Tensor:
    """Per-row counters, zero between launches (the last program of each row resets its own), one set per device and
    stream, allocated once and grown when the batch does."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _tickets.get((device, stream))
    if counters is None or counters.numel() < batch:
        counters = torch.zeros(max(batch, 256), device=device, dtype=torch.int32)
        _tickets[(device, stream)] = counters
    return counters


def _aligned(logits: torch.Tensor) -> bool:
    """Whether Triton would see the base pointer, the row stride and the vocabulary size as multiples of 16: the
    `_steer_aligned` variant."""
    return logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0 and logits.shape[-1] % 16 == 0


def _launch(
    logits: torch.Tensor,
    k: int,
    steering: tuple[torch.Tensor, torch.Tensor, float] | None,
    block: int | None,
    splits: int | None,
) -> tuple[torch.Tensor, ...]:
    """Launch the step on `logits` (adjusted in place when steering); returns entropy, values-or-delta, indices and
    the `[2, B]` bool flags (gated, changed; None without steering)."""
    batch, vocab = logits.shape
    device = logits.device
    weight = steering[1] if steering is not None else None
    spec = specialization(logits.dtype, None if weight is None else weight.dtype, _aligned(logits))
    config = spec.config.with_block(block) if block else spec.config
    splits, chunk_tiles = chunking(vocab, splits or default_splits(batch, vocab, config.block, device), config.block)
    entropy = torch.empty(batch, device=device, dtype=torch.float32)
    values = torch.empty(batch, k, device=device, dtype=torch.float32)
    indices = torch.empty(batch, k, device=device, dtype=torch.int64)
    keys = torch.empty(batch * splits * MAX_K, device=device, dtype=torch.int64)
    stats = torch.empty(batch * splits * 3, device=device, dtype=torch.float32)
    flags = torch.empty(2, batch, device=device, dtype=torch.bool) if steering is not None else None
    correction, weight, tau = steering if steering is not None else (entropy, entropy, 0.0)
    hidden = correction.shape[-1] if steering is not None else 0
    with device_guard(device):
        jitted(spec.aligned)[(splits, batch)](
            logits, keys, stats, _ticket_counters(device, batch), correction, weight,
            entropy, values, indices, flags if flags is not None else entropy,
            vocab, logits.stride(0), chunk_tiles, k, hidden, correction.stride(0), weight.stride(0), float(tau),
            BLOCK=config.block, LANES=config.lanes, SUB=config.sub, STEER=steering is not None,
            num_warps=config.num_warps,
        )
    return entropy, values, indices, flags


def _check(logits: torch.Tensor, k: int, weight: torch.Tensor | None = None) -> None:
    check_logits(logits, k)
    if k > MAX_K:
        raise ValueError(f"the Triton kernel supports k up to {MAX_K}; got k={k}")
    if not kernel_serves(logits.dtype, k, None if weight is None else weight.dtype):
        raise ValueError(f"the Triton kernel does not serve {logits.dtype} logits with a "
                         f"{None if weight is None else weight.dtype} output embedding")
    if logits.stride(0) >= 2**31:
        raise ValueError("the Triton kernel needs a row stride below 2^31 elements; pass contiguous rows")


def entropy_topk(logits: torch.Tensor, k: int, *, block: int | None = None, splits: int | None = None) -> EntropyTopK:
    """Triton version of [`steer.reference.entropy_topk`]: entropy (nats, float32) and top-k of each row, in one
    read of the logits and one launch. Among tied values the smaller index comes first.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): float32, float16 or bfloat16, on a CUDA device
            (or on the CPU under `TRITON_INTERPRET=1`); rows may be strided (`logits[:, -1, :]` of `[B, T, V]`).
        k (`int`): 1 to 16.
        block (`int`, *optional*): entries per tile, a power of two; by default the launch configuration of the
            dtype (`LAUNCH_CONFIGS`). For tests and benchmarks: the dispatcher never passes it.
        splits (`int`, *optional*): programs per row; by default enough to fill the device.

    Example:

    ```python
    >>> entropy, values, indices = entropy_topk(torch.randn(4, 32000, device="cuda"), k=5)  # doctest: +SKIP
    ```
    """
    _check(logits, k)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    entropy, values, indices, _ = _launch(logits, k, None, block, splits)
    return EntropyTopK(entropy, values, indices)


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
    *,
    inplace: bool = False,
    block: int | None = None,
    splits: int | None = None,
) -> SteeredLogits:
    """Triton version of [`steer.reference.steer_logits`]: statistics, top-k and the head's correction of the top-k
    logits of rows whose entropy exceeds `tau`, in one read of the logits and one launch.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): as in [`entropy_topk`].
        correction (`torch.Tensor` of shape `(batch_size, hidden_size)`): the head's projection of the hidden states.
        output_embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the model's output embedding, of
            a dtype in `WEIGHT_DTYPES[logits.dtype]`.
        k (`int`): 1 to 16. tau (`float`): entropy threshold in nats.
        inplace (`bool`, defaults to `False`): adjust `logits` itself (only k entries of each gated row are written);
            otherwise a copy is adjusted and `logits` is left untouched.
        block, splits: as in [`entropy_topk`].

    Example:

    ```python
    >>> weight = model.get_output_embeddings().weight  # doctest: +SKIP
    >>> out = steer_logits(scores, correction, weight, k=5, tau=1.4, inplace=True)  # doctest: +SKIP
    ```
    """
    _check(logits, k, output_embedding)
    if (correction.shape[0] != logits.shape[0] or output_embedding.shape[0] != logits.shape[-1]
            or correction.shape[-1] != output_embedding.shape[-1]):
        raise ValueError(
            f"correction {tuple(correction.shape)} and output embedding {tuple(output_embedding.shape)} do not match "
            f"logits {tuple(logits.shape)}: expected [B, H], [V, H] for logits [B, V]"
        )
    if inplace and logits.stride(-1) != 1:
        raise ValueError("inplace=True needs logits whose last dimension is contiguous")
    correction = correction.float() if correction.stride(-1) == 1 else correction.float().contiguous()
    output_embedding = output_embedding if output_embedding.stride(-1) == 1 else output_embedding.contiguous()
    out = logits if inplace else logits.clone(memory_format=torch.contiguous_format)
    entropy, delta, indices, flags = _launch(out, k, (correction, output_embedding, tau), block, splits)
    return SteeredLogits(out, entropy, indices, delta, flags[0], flags[1])
