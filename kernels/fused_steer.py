"""Triton kernels for one decoding step: entropy, top-k and the steering adjustment in one read of the logits.

Two launches per step, each row split over `splits` programs so that small batches still fill the GPU:

1. `_partials_kernel`, grid `(splits, B)`: each program sweeps its chunk of the row once, in tiles of `BLOCK`
   entries, and keeps the online softmax statistics of the chunk (running max m, d = sum e^(x - m) and
   t = sum e^(x - m) (x - m)) and a running top-k. Optionally it writes each tile to the output tensor as it goes
   (the copy that leaves the input untouched costs a write but no second read).
2. `_combine_kernel`, grid `(B,)`: merges the partials of a row into its log-sum-exp and entropy (log d - t / d),
   merges the chunks' top-k, and where the entropy exceeds `tau` computes the head's correction of each candidate
   (a dot product of its output-embedding row with the row's correction vector) and writes the k adjusted logits.
   Nothing else of the row is read again: the adjustment touches only k entries.

Top-k with indices uses one 64-bit key per entry: the float's bits mapped to an integer of the same order in the high
half, and `0xFFFFFFFF - index` in the low half, so that `tl.topk` on keys returns the largest values and, among
equal values, the smallest index. A tile whose largest key cannot enter the running top-k is skipped.

NaN and `-inf` follow :mod:`steer.reference`: `-inf` entries add nothing; a row with a NaN, or of only `-inf`, gets
NaN entropy and is never gated (its top-k is unspecified).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steer.functional import TRITON_MAX_K as MAX_K
from steer.reference import EntropyTopK, SteeredLogits, check_logits

INT64_MIN = -(2**63)
PROGRAMS_PER_SM = 4  # target of the split: this many programs per streaming multiprocessor over the batch


@triton.jit
def _ordered_keys(x, cols):
    """int64 keys whose order is the order of the float32 values `x`, ties broken towards the smaller column."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _key_values(keys):
    """The float32 values of keys made by `_ordered_keys`."""
    ordered = (keys >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_columns(keys):
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


@triton.jit
def _merge_topk(best, keys, K_PAD: tl.constexpr):
    """The K_PAD largest of the running top-k `best` [K_PAD] and the K_PAD largest of `keys`."""
    top = tl.topk(keys, K_PAD)
    return tl.topk(tl.reshape(tl.join(best, top), [2 * K_PAD]), K_PAD)


@triton.jit
def _rescaled(m, d, t, m_new):
    """`(d, t)` of statistics kept relative to max `m`, re-expressed relative to `m_new >= m`; exact with -inf."""
    alpha = tl.exp(m - m_new)
    shift = d * tl.where(d > 0, m - m_new, 0.0)
    return alpha * d, alpha * (t + shift)


@triton.jit
def _partials_kernel(
    logits_ptr, out_ptr, m_ptr, d_ptr, t_ptr, keys_ptr,
    vocab, stride_logits, stride_out, chunk,
    BLOCK: tl.constexpr, K_PAD: tl.constexpr, WRITE_OUT: tl.constexpr,
):
    split = tl.program_id(0)
    row = tl.program_id(1)
    splits = tl.num_programs(0)
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    offsets = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    best = tl.full([K_PAD], INT64_MIN, tl.int64)
    for start in range(begin, end, BLOCK):
        cols = start + offsets
        inside = cols < end
        raw = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=float("-inf"))
        if WRITE_OUT:
            tl.store(out_ptr + row * stride_out + cols, raw, mask=inside)
        x = raw.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        reference = tl.where(m_new == float("-inf"), 0.0, m_new)
        d, t = _rescaled(m, d, t, reference)
        dead = x == float("-inf")  # no probability, no entropy; NaN is not dead and propagates
        z = tl.where(dead, 0.0, x - reference)
        e = tl.where(dead, 0.0, tl.exp(z))
        d += tl.sum(e, axis=0)
        t += tl.sum(z * e, axis=0)
        m = m_new
        keys = tl.where(inside, _ordered_keys(x, cols), INT64_MIN)
        if tl.max(keys, axis=0) > tl.min(best, axis=0):
            best = _merge_topk(best, keys, K_PAD)
    slot = row * splits + split  # d and t are relative to m; a chunk of only -inf has d = t = 0
    tl.store(m_ptr + slot, m)
    tl.store(d_ptr + slot, d)
    tl.store(t_ptr + slot, t)
    tl.store(keys_ptr + slot * K_PAD + tl.arange(0, K_PAD), best)


@triton.jit
def _combine_kernel(
    m_ptr, d_ptr, t_ptr, keys_ptr,
    out_ptr, correction_ptr, weight_ptr,
    entropy_ptr, values_ptr, indices_ptr, delta_ptr, gated_ptr, changed_ptr,
    splits, k, hidden, tau, stride_out, stride_correction, stride_weight,
    S_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr, STEER: tl.constexpr,
):
    row = tl.program_id(0)
    lanes = tl.arange(0, S_PAD)
    present = lanes < splits
    ms = tl.load(m_ptr + row * splits + lanes, mask=present, other=float("-inf"))
    ds = tl.load(d_ptr + row * splits + lanes, mask=present, other=0.0)
    ts = tl.load(t_ptr + row * splits + lanes, mask=present, other=0.0)
    m = tl.max(ms, axis=0)
    reference = tl.where(m == float("-inf"), 0.0, m)
    ds, ts = _rescaled(ms, ds, ts, reference)
    d = tl.sum(ds, axis=0)
    entropy = tl.log(d) - tl.sum(ts, axis=0) / d
    tl.store(entropy_ptr + row, entropy)

    slots = tl.arange(0, K_PAD)
    chunk_keys = tl.load(keys_ptr + (row * splits + lanes[:, None]) * K_PAD + slots[None, :], mask=present[:, None],
                         other=INT64_MIN)
    best = tl.topk(tl.reshape(chunk_keys, [S_PAD * K_PAD]), K_PAD)
    values = _key_values(best)
    columns = _key_columns(best)
    wanted = slots < k
    tl.store(values_ptr + row * k + slots, values, mask=wanted)
    tl.store(indices_ptr + row * k + slots, columns, mask=wanted)
    if STEER:
        gated = entropy > tau
        delta = tl.zeros([K_PAD], tl.float32)
        if gated:
            for start in range(0, hidden, BLOCK_H):
                dims = start + tl.arange(0, BLOCK_H)
                inside = dims < hidden
                c = tl.load(correction_ptr + row * stride_correction + dims, mask=inside, other=0.0).to(tl.float32)
                w = tl.load(weight_ptr + columns[:, None] * stride_weight + dims[None, :],
                            mask=wanted[:, None] & inside[None, :], other=0.0).to(tl.float32)
                delta += tl.sum(w * c[None, :], axis=1)
            adjusted = values + delta
            tl.store(out_ptr + row * stride_out + columns, adjusted.to(out_ptr.dtype.element_ty), mask=wanted)
            first = tl.sum(tl.where(slots == 0, adjusted, 0.0), axis=0)
            others = tl.max(tl.where((slots > 0) & wanted, adjusted, float("-inf")), axis=0)
            tl.store(changed_ptr + row, (others > first).to(tl.int8))
        else:
            tl.store(changed_ptr + row, tl.zeros([], tl.int8))
        tl.store(delta_ptr + row * k + slots, delta, mask=wanted)
        tl.store(gated_ptr + row, gated.to(tl.int8))


def default_splits(batch: int, vocab: int, block: int, device: torch.device) -> int:
    """Programs per row: enough that the batch fills the device, at most one per tile."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: splitting buys nothing but is still exercised
        target = 2
    return max(1, min(triton.cdiv(vocab, block), triton.cdiv(target, batch)))


def chunking(vocab: int, splits: int, block: int) -> tuple[int, int]:
    """`(splits, chunk)`: chunks of a whole number of tiles covering the row; `splits` shrinks if tiles run out."""
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    return triton.cdiv(vocab, chunk), chunk


def _launch(
    logits: torch.Tensor,
    k: int,
    out: torch.Tensor | None,
    steering: tuple[torch.Tensor, torch.Tensor, float] | None,
    block: int,
    splits: int | None,
) -> tuple[torch.Tensor, ...]:
    check_logits(logits, k)
    if k > MAX_K:
        raise ValueError(f"the Triton kernel supports k up to {MAX_K}; got k={k}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    batch, vocab = logits.shape
    device = logits.device
    splits, chunk = chunking(vocab, splits or default_splits(batch, vocab, block, device), block)
    k_pad = triton.next_power_of_2(k)
    floats = dict(device=device, dtype=torch.float32)
    m, d, t = (torch.empty(batch, splits, **floats) for _ in range(3))
    keys = torch.empty(batch, splits, k_pad, device=device, dtype=torch.int64)
    write_out = out is not None and out.data_ptr() != logits.data_ptr()
    target = out if out is not None else logits
    _partials_kernel[(splits, batch)](
        logits, target, m, d, t, keys, vocab, logits.stride(0), target.stride(0), chunk,
        BLOCK=block, K_PAD=k_pad, WRITE_OUT=write_out,
    )
    entropy = torch.empty(batch, **floats)
    values = torch.empty(batch, k, **floats)
    indices = torch.empty(batch, k, device=device, dtype=torch.int64)
    delta = torch.zeros(batch, k, **floats)
    flags = torch.zeros(2, batch, device=device, dtype=torch.int8)
    correction, weight, tau = steering if steering is not None else (entropy, entropy, float("inf"))
    hidden = correction.shape[-1] if steering is not None else 1
    _combine_kernel[(batch,)](
        m, d, t, keys, target, correction, weight, entropy, values, indices, delta, flags[0], flags[1],
        splits, k, hidden, float(tau), target.stride(0), correction.stride(0), weight.stride(0),
        S_PAD=triton.next_power_of_2(splits), K_PAD=k_pad, BLOCK_H=min(128, triton.next_power_of_2(hidden)),
        STEER=steering is not None,
    )
    return entropy, values, indices, delta, flags[0].bool(), flags[1].bool()


def entropy_topk(logits: torch.Tensor, k: int, *, block: int = 1024, splits: int | None = None) -> EntropyTopK:
    """Triton version of [`steer.reference.entropy_topk`]: entropy (nats, float32) and top-k of each row, in one
    read of the logits. Among tied values the smaller index comes first.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): float32, float16 or bfloat16, on a CUDA device
            (or on the CPU under `TRITON_INTERPRET=1`).
        k (`int`): 1 to 16.
        block (`int`, defaults to 1024): entries per tile, a power of two.
        splits (`int`, *optional*): programs per row; by default enough to fill the device.

    Example:

    ```python
    >>> entropy, values, indices = entropy_topk(torch.randn(4, 32000, device="cuda"), k=5)  # doctest: +SKIP
    ```
    """
    entropy, values, indices, *_ = _launch(logits, k, None, None, block, splits)
    return EntropyTopK(entropy, values, indices)


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
    *,
    inplace: bool = False,
    block: int = 1024,
    splits: int | None = None,
) -> SteeredLogits:
    """Triton version of [`steer.reference.steer_logits`]: statistics, top-k and the head's correction of the top-k
    logits of rows whose entropy exceeds `tau`, reading the logits once.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): as in [`entropy_topk`].
        correction (`torch.Tensor` of shape `(batch_size, hidden_size)`): the head's projection of the hidden states.
        output_embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): rows must be contiguous.
        k (`int`): 1 to 16. tau (`float`): entropy threshold in nats.
        inplace (`bool`, defaults to `False`): adjust `logits` itself instead of a copy (saves writing the copy).
        block, splits: as in [`entropy_topk`].

    Example:

    ```python
    >>> out = steer_logits(logits, correction, model.get_output_embeddings().weight, k=5, tau=1.4)  # doctest: +SKIP
    ```
    """
    if (correction.shape[0] != logits.shape[0] or output_embedding.shape[0] != logits.shape[-1]
            or correction.shape[-1] != output_embedding.shape[-1]):
        raise ValueError(
            f"correction {tuple(correction.shape)} and output embedding {tuple(output_embedding.shape)} do not match "
            f"logits {tuple(logits.shape)}: expected [B, H], [V, H] for logits [B, V]"
        )
    if inplace and logits.stride(-1) != 1:
        raise ValueError("inplace=True needs logits whose last dimension is contiguous")
    correction = correction if correction.stride(-1) == 1 else correction.contiguous()
    output_embedding = output_embedding if output_embedding.stride(-1) == 1 else output_embedding.contiguous()
    out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    entropy, _, indices, delta, gated, changed = _launch(
        logits, k, out, (correction, output_embedding, tau), block, splits)
    return SteeredLogits(out, entropy, indices, delta, gated, changed)
