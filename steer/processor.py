"""Steered decoding for any Hugging Face causal LM: a `LogitsProcessor` plus the hook that feeds it hidden states.

`transformers` hands a logits processor only `(input_ids, scores)`. The correction head also needs the final hidden
state the logits came from, so [`SteeringProcessor`] registers a forward hook on the model's output embedding
(`model.get_output_embeddings()`): its input *is* that hidden state, whatever the architecture (tied or untied
embeddings, soft-capped or scaled logits, mixture-of-experts blocks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor

from steer.continuous_batching import refuse_continuous_batching
from steer.errors import SteeringError
from steer.functional import steer_logits
from steer.head import CorrectionHead, output_embedding


@dataclass(frozen=True)
class SteeringStats:
    """Counters of a [`SteeringProcessor`] since it was built or last reset.

    Attributes:
        steps (`int`): processor calls (decoding steps).
        rows (`int`): rows seen over all steps (a step over a batch of 8 counts 8).
        gated (`int`): rows whose base entropy exceeded `tau` (decision points), which the head adjusted.
        changed (`int`): gated rows whose best candidate after the adjustment is not the base top-1.
    """

    steps: int = 0
    rows: int = 0
    gated: int = 0
    changed: int = 0

    @property
    def gated_fraction(self) -> float:
        return self.gated / self.rows if self.rows else 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.rows if self.rows else 0.0


class _FinalHiddenCapture:
    """Forward hook on the output embedding that keeps the last position's input (the final hidden state).

    It counts the forwards since the last [`take`], so that the processor can tell when a step's logits do not
    come from exactly one forward pass. The hook holds the capture weakly: if its owner is garbage-collected without
    being closed, the hook does nothing and is removed.
    """

    def __init__(self, module: nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        self.forwards = 0
        self.positions = 0
        self._handle = module.register_forward_hook(_hook_calling(weakref.ref(self)))
        self._finalizer = weakref.finalize(self, self._handle.remove)

    def record(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden[..., -1, :].detach() if hidden.dim() > 2 else hidden.detach()
        self.positions = hidden.shape[-2] if hidden.dim() > 2 else 1
        self.forwards += 1

    def take(self) -> tuple[torch.Tensor | None, int]:
        """The latest hidden state `[rows, hidden_size]` and the number of forwards since the previous take."""
        hidden, forwards = self.hidden, self.forwards
        self.hidden, self.forwards = None, 0
        return hidden, forwards

    def remove(self) -> None:
        self._finalizer()


def _hook_calling(capture_ref: weakref.ReferenceType[_FinalHiddenCapture]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        capture = capture_ref()
        if capture is not None and args:
            capture.record(args[0])

    return hook


class SteeringProcessor(LogitsProcessor):
    r"""[`LogitsProcessor`] that applies a [`CorrectionHead`] at decision points.

    At each decoding step and for each row, it computes the entropy of the base distribution (the scores it is
    handed, at temperature 1); where the entropy exceeds `head.tau`, it adds the head's correction to the logits of
    the base top-`head.top_k` candidates. Every other row, and every other logit, is left exactly as it was.

    It works with greedy search, sampling, beam search, `num_return_sequences`, left-padded batches, the KV cache
    and other logits processors. Steering needs one forward pass per step: decoding modes that feed several
    positions per forward (assisted or speculative generation, prompt lookup) or run the model again between steps
    (classifier-free guidance) raise [`SteeringError`].

    The head is moved to the device of the model's output embedding. The hook is removed by [`close`], or on leaving
    a `with` block, also when `generate` raises. `head.tau` and `head.top_k` are read at every step, so they can be
    changed between calls.

    Like every processor in `transformers`, it returns new scores and leaves the tensor it is handed untouched:
    `generate(..., output_logits=True)` keeps that very tensor as the model's raw logits. A caller that knows nobody
    keeps it can pass `inplace=True`: only the k entries of each gated row are then written, in the tensor itself,
    which saves a copy of the whole `[B, V]` scores every step ([`steer.generate`] does so whenever `output_logits`
    is off).

    Args:
        model (`PreTrainedModel`): the causal LM whose logits are steered.
        head ([`CorrectionHead`]): a head made for `model` (checked at construction: [`HeadMismatchError`]).
        record_rows (`bool`, defaults to `False`): keep the per-step gated and changed masks, for per-sequence
            counters (see [`row_masks`]).
        inplace (`bool`, defaults to `False`): steer the scores it is handed in place instead of returning a
            steered copy (see above). Only where nothing else keeps them: not with `output_logits=True`.

    Example:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> with SteeringProcessor(model, head) as steering:  # doctest: +SKIP
    ...     out = model.generate(**inputs, logits_processor=LogitsProcessorList([steering]))
    >>> steering.stats.gated_fraction  # doctest: +SKIP
    ```
    """

    def __init__(
        self, model: nn.Module, head: CorrectionHead, record_rows: bool = False, inplace: bool = False
    ) -> None:
        head.check_compatible(model)
        self.head = head
        self.record_rows = record_rows
        self.inplace = inplace
        self._weight = output_embedding(model)
        self._weight_copies: dict[torch.device, torch.Tensor] = {}
        head.to(self._weight.device)
        self._capture = _FinalHiddenCapture(model.get_output_embeddings())
        self._release_batching = weakref.finalize(self, refuse_continuous_batching(model))
        self.reset()

    def reset(self) -> None:
        """Zero the counters, drop recorded masks and any hidden state captured outside a decoding step."""
        self._counts = torch.zeros(2, dtype=torch.long)  # gated, changed; summed on the device, read at `stats`
        self._steps = 0
        self._rows = 0
        self._previous_shape: tuple[int, int] | None = None
        self._gated_steps: list[torch.Tensor] = []
        self._changed_steps: list[torch.Tensor] = []
        self._capture.take()

    @property
    def stats(self) -> SteeringStats:
        gated, changed = self._counts.tolist()
        return SteeringStats(steps=self._steps, rows=self._rows, gated=gated, changed=changed)

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step masks recorded with `record_rows=True`: `(gated, changed)`, each `torch.BoolTensor` of shape
        `(rows, steps)`. Rows keep their order within a step (beam search reorders beams between steps)."""
        if not self.record_rows:
            raise RuntimeError("row_masks() needs SteeringProcessor(..., record_rows=True)")
        if not self._gated_steps:
            return torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, 0, dtype=torch.bool)
        return torch.stack(self._gated_steps, dim=1).cpu(), torch.stack(self._changed_steps, dim=1).cpu()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        hidden = self._step_hidden(input_ids, scores)
        correction = self.head.project(hidden).to(scores.device)
        out = steer_logits(scores, correction, self._weight_on(scores.device), self.head.top_k, self.head.tau,
                           inplace=self.inplace)
        self._count(out.gated, out.changed)
        return out.logits

    def _step_hidden(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """The hidden state this step's scores came from, or a [`SteeringError`] when that is ambiguous."""
        hidden, forwards = self._capture.take()
        continuing = self._previous_shape == (input_ids.shape[0], input_ids.shape[1] - 1)
        self._previous_shape = tuple(input_ids.shape)
        if forwards == 0:
            raise SteeringError(
                "the logits processor was called without a new forward pass of the model: this decoding mode scores "
                "several positions per forward (assisted or speculative generation, prompt lookup), which steering "
                "does not support"
            )
        if continuing and forwards > 1:
            raise SteeringError(
                f"the model ran {forwards} forward passes between two decoding steps (classifier-free guidance, or a "
                "logits processor that calls the model): steering cannot tell which hidden state the logits came from"
            )
        if hidden.shape[0] != scores.shape[0]:
            raise SteeringError(
                f"the last forward pass had {hidden.shape[0]} rows but the scores have {scores.shape[0]}: the scores "
                "do not come from that forward pass"
            )
        if scores.shape[-1] != self._weight.shape[0]:
            raise SteeringError(
                f"the scores have {scores.shape[-1]} entries per row but the output embedding has "
                f"{self._weight.shape[0]} rows"
            )
        return hidden

    def _weight_on(self, device: torch.device) -> torch.Tensor:
        """The output embedding on `device` (a copy is kept when the model's LM head lives on another device)."""
        if self._weight.device == device:
            return self._weight
        if device not in self._weight_copies:
            self._weight_copies[device] = self._weight.detach().to(device)
        return self._weight_copies[device]

    def _count(self, gated: torch.Tensor, changed: torch.Tensor) -> None:
        self._steps += 1
        self._rows += gated.shape[0]
        counts = torch.stack([gated, changed]).sum(dim=-1)
        self._counts = self._counts.to(counts.device) + counts
        if self.record_rows:
            self._gated_steps.append(gated)
            self._changed_steps.append(changed)

    def close(self) -> None:
        """Remove the hook from the model. Idempotent."""
        self._capture.remove()
        self._release_batching()

    def __enter__(self) -> SteeringProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
