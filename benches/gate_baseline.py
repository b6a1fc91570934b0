"""The gate without a head: a decoding baseline that shows what a learned head adds over its entropy gate alone.

At a decision point (base entropy above `tau`), the base model's top-1 token is taken, as greedy search would;
everywhere else the model samples as usual. It is "a lower temperature only at decision points" at its limit
(temperature 0), and the natural rival of a head: a head also acts only above `tau`, and much of what RL gains on
small models is sharpening.

    arm = Arm("gate", model, decision_argmax(tau=1.2))      # steer.pipeline.evaluation.Arm

Used by `benches/paper_table_gsm8k.py`.
"""

from __future__ import annotations

import torch

from steer.functional import entropy_topk
from steer.pipeline.decoding import ProcessorFactory


class DecisionArgmax:
    """A logits processor (transformers' `LogitsProcessor` interface, with the row masks that
    `steer.pipeline.decoding.decode_batch` records) that puts all mass on the top-1 token where the entropy of the
    scores exceeds `tau`.

    Args:
        tau (`float`): the gate, in nats, on the entropy of the scores this processor receives.
    """

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self._gated: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        stats = entropy_topk(scores, 1)
        gated = stats.entropy > self.tau
        self._gated.append(gated.cpu())
        forced = torch.full_like(scores, float("-inf")).scatter_(1, stats.indices[:, :1], 0.0)
        return torch.where(gated.unsqueeze(1), forced, scores)

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gated, changed)` of shape `(rows, steps)`: the steps the gate forced, and (none) where that changed the
        top-1, which taking the top-1 never does."""
        if not self._gated:
            return torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, 0, dtype=torch.bool)
        gated = torch.stack(self._gated, dim=1)
        return gated, torch.zeros_like(gated)

    def close(self) -> None:
        self._gated = []


def decision_argmax(tau: float) -> ProcessorFactory:
    """The factory of [`DecisionArgmax`] processors for evaluation arms."""
    return lambda batch: DecisionArgmax(tau)
