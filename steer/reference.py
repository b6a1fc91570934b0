"""The per-step decoding math in PyTorch: the CPU path, and the reference the Triton kernel is tested against.

Two operations, both on a batch of next-token logits ``[B, V]``:

- :func:`entropy_topk`: Shannon entropy (nats) of ``softmax(logits)`` and the top-k candidates of each row;
- :func:`steer_logits`: the same statistics, plus the correction head's adjustment applied to the top-k logits of
  the rows whose entropy exceeds ``tau`` (the decision points).

Conventions shared with the Triton path (:mod:`steer.kernels`):

- all arithmetic is float32, whatever the input dtype;
- ``-inf`` entries (a masked vocabulary) carry zero probability and add nothing to the entropy;
- a row that contains NaN, or whose entries are all ``-inf``, has NaN entropy; such a row is never gated, so
  :func:`steer_logits` returns it unchanged. Its top-k values and indices are unspecified.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CPU_ENTROPY_CHUNK = 2048  # vocabulary columns per pass of the entropy on the CPU


class EntropyTopK(NamedTuple):
    """Per-row entropy and top-k candidates of a batch of logits.

    Attributes:
        entropy (`torch.FloatTensor` of shape `(batch_size,)`): Shannon entropy of `softmax(logits)` in nats.
        values (`torch.FloatTensor` of shape `(batch_size, k)`): the k largest logits of each row, in float32,
            in descending order.
        indices (`torch.LongTensor` of shape `(batch_size, k)`): their vocabulary indices.
    """

    entropy: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


class SteeredLogits(NamedTuple):
    """Result of one steering step over a batch of logits.

    Attributes:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): the adjusted logits, same dtype as the input.
            Rows that were not gated are bit-for-bit copies of the input rows.
        entropy (`torch.FloatTensor` of shape `(batch_size,)`): entropy of the *base* distribution, in nats.
        indices (`torch.LongTensor` of shape `(batch_size, k)`): the base top-k candidates.
        delta (`torch.FloatTensor` of shape `(batch_size, k)`): the correction added to each candidate (zero in rows
            that were not gated).
        gated (`torch.BoolTensor` of shape `(batch_size,)`): rows whose entropy exceeded `tau`.
        changed (`torch.BoolTensor` of shape `(batch_size,)`): gated rows whose best candidate after the adjustment is
            not the base top-1.
    """

    logits: torch.Tensor
    entropy: torch.Tensor
    indices: torch.Tensor
    delta: torch.Tensor
    gated: torch.Tensor
    changed: torch.Tensor


def check_logits(logits: torch.Tensor, k: int) -> None:
    """Raise a `ValueError` naming the problem if `logits` is not a `[B, V]` floating tensor with `1 <= k <= V`."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab]; got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor; got {logits.dtype}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {logits.shape[-1]}; got k={k}")


def entropy_topk(logits: torch.Tensor, k: int) -> EntropyTopK:
    """Entropy (nats) of `softmax(logits)` and the top-k candidates of each row, computed in float32.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): float32, float16 or bfloat16; may contain `-inf`.
        k (`int`): number of candidates, `1 <= k <= vocab_size`.

    Returns:
        [`EntropyTopK`]: `entropy` `[B]` float32, `values` `[B, k]` float32, `indices` `[B, k]` int64. Among tied
        values, which index is returned is unspecified.

    Example:

    ```python
    >>> import torch
    >>> from steer.reference import entropy_topk
    >>> out = entropy_topk(torch.tensor([[0.0, 0.0, float("-inf")]]), k=1)
    >>> round(out.entropy.item(), 4)  # two equally likely tokens: log(2)
    0.6931
    ```
    """
    check_logits(logits, k)
    x = logits.float()
    values, indices = _topk(x, k)
    return EntropyTopK(_entropy(x), values, indices)


def _entropy(x: torch.Tensor) -> torch.Tensor:
    """Row entropy from the softmax statistics: with z = x - max, d = sum e^z and s = sum z e^z, the entropy is
    log d - s / d. On the CPU the vocabulary is read in chunks of `CPU_ENTROPY_CHUNK` columns, so that the
    temporaries stay in cache and no `[B, V]` buffer is allocated (each large allocation costs page faults: with a
    `[64, 49152]` buffer a step took 19 ms on one core, in chunks 5 ms); elsewhere in one pass."""
    maximum = x.amax(dim=-1, keepdim=True)
    chunk = CPU_ENTROPY_CHUNK if x.device.type == "cpu" else x.shape[-1]
    d = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    s = torch.zeros_like(d)
    for start in range(0, x.shape[-1], chunk):
        # Entries more than 1e4 below the maximum (-inf included) have e^z = 0 in float32 either way; the clamp makes
        # their z finite, so that z e^z is 0 rather than NaN. NaN (a NaN logit, or a row of only -inf) propagates.
        z = (x[:, start : start + chunk] - maximum).clamp_(min=-1e4)
        e = z.exp()
        d += e.sum(dim=-1)
        s += e.mul_(z).sum(dim=-1)
    return d.log() - s / d


def _topk(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk` over the rows of `x`, through a pre-filter that is exact and much faster on long CPU rows.

    The k largest entries of a row lie in the k blocks (of `block` consecutive entries) with the largest maxima:
    an entry in any other block is exceeded by k block maxima. So the top-k of those k blocks is the row's top-k
    (as a multiset of values; among ties the index may differ). A row with fewer than k finite entries can pick up
    the -inf padding of the last block, so such rows are redone with `torch.topk`.
    """
    batch, vocab = x.shape
    blocks = vocab // block
    if blocks <= 2 * k:
        return torch.topk(x, k, dim=-1)
    maxima = x[:, : blocks * block].reshape(batch, blocks, block).amax(dim=-1)
    if vocab % block:
        maxima = torch.cat([maxima, x[:, blocks * block :].amax(dim=-1, keepdim=True)], dim=-1)
    chosen = maxima.topk(k, dim=-1).indices
    columns = (chosen.unsqueeze(-1) * block + torch.arange(block, device=x.device)).flatten(1)
    candidates = x.gather(-1, columns.clamp(max=vocab - 1)).masked_fill_(columns >= vocab, float("-inf"))
    values, position = candidates.topk(k, dim=-1)
    indices = columns.gather(-1, position)
    short = values[:, -1] == float("-inf")
    if short.any():
        values[short], indices[short] = torch.topk(x[short], k, dim=-1)
    return values, indices


def candidate_deltas(correction: torch.Tensor, output_embedding: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The head's correction for each candidate, `<output_embedding[indices[b, j]], correction[b]>` less its mean
    over the row's k candidates (see [`center_deltas`]): it re-ranks the candidates without moving them together.

    Args:
        correction (`torch.Tensor` of shape `(batch_size, hidden_size)`): the head's projection of the hidden state.
        output_embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the model's output embedding.
        indices (`torch.LongTensor` of shape `(batch_size, k)`): candidate token ids.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, k)`.
    """
    rows = output_embedding[indices].float()  # [B, k, H]
    return center_deltas(torch.bmm(rows, correction.float().unsqueeze(-1)).squeeze(-1))


def steer_logits(
    logits: torch.Tensor,
    correction: torch.Tensor,
    output_embedding: torch.Tensor,
    k: int,
    tau: float,
    *,
    inplace: bool = False,
) -> SteeredLogits:
    """Add the head's correction to the top-k logits of every row whose base entropy exceeds `tau`.

    Rows at or below `tau` (and rows with NaN entropy) are returned unchanged, as are all logits outside the top-k.
    The input is not modified unless `inplace=True`.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, vocab_size)`): next-token logits (float32, float16 or bfloat16).
        correction (`torch.Tensor` of shape `(batch_size, hidden_size)`): the head's projection of each row's final
            hidden state (see [`CorrectionHead.project`]).
        output_embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the model's output embedding.
        k (`int`): number of candidates to re-score.
        tau (`float`): entropy threshold in nats; `float("inf")` disables steering.
        inplace (`bool`, defaults to `False`): write the adjusted top-k into `logits` itself and return it as the
            result's `logits`, instead of a copy.

    Returns:
        [`SteeredLogits`].

    Example:

    ```python
    >>> import torch
    >>> from steer.reference import steer_logits
    >>> logits = torch.tensor([[2.0, 2.0, 0.0], [9.0, 0.0, 0.0]])
    >>> embedding = torch.eye(3)
    >>> correction = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    >>> out = steer_logits(logits, correction, embedding, k=2, tau=0.5)
    >>> out.gated.tolist(), out.logits[0].tolist()  # only the uncertain first row is steered; deltas -0.5, +0.5
    ([True, False], [1.5, 2.5, 0.0])
    ```
    """
    check_logits(logits, k)
    x = logits.float()
    entropy = _entropy(x)
    values, indices = _topk(x, k)
    gated = entropy > tau
    delta = candidate_deltas(correction, output_embedding, indices).masked_fill(~gated.unsqueeze(-1), 0.0)
    adjusted = values + delta
    # Ungated rows get their own top-k values written back: a bit-exact copy.
    new_values = torch.where(gated.unsqueeze(-1), adjusted, values).to(logits.dtype)
    out = logits if inplace else logits.clone()
    out.scatter_(-1, indices, new_values)
    changed = gated & (adjusted.argmax(dim=-1) != 0)
    return SteeredLogits(out, entropy, indices, delta, gated, changed)


def center_deltas(deltas: torch.Tensor, steerable: torch.Tensor | None = None) -> torch.Tensor:
    """The head's raw corrections made to re-rank the candidates only: minus their mean over the `steerable`
    candidates (all by default), and 0 for the others.

    A loss over the candidates alone cannot see a shift common to all of them (softmax is shift-invariant), so a
    head's raw corrections may carry one; applied to the top-k of the full vocabulary it would move every candidate
    together, up or below the tokens outside the top-k. Centred, a correction only changes their order.

    Args:
        deltas (`torch.Tensor` of shape `(batch_size, k)`): raw corrections `<W_u[j], c>`.
        steerable (`torch.BoolTensor` of shape `(batch_size, k)`, *optional*).

    Example:

    ```python
    >>> center_deltas(torch.tensor([[3.0, 1.0, 5.0]]), torch.tensor([[True, True, False]])).tolist()
    [[1.0, -1.0, 0.0]]
    ```
    """
    if steerable is None:
        return deltas - deltas.mean(dim=-1, keepdim=True)
    mask = steerable.to(deltas.dtype)
    mean = (deltas * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return (deltas - mean) * mask
