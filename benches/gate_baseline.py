"""The gate without a head: a decoding baseline that shows what a learned head adds over its entropy gate alone.

At a decision point (base entropy above `tau`), the base model's top-1 token is taken, as greedy search would;
everywhere else the model samples as usual. It is "a lower temperature only at decision points" at its limit
(temperature 0), and the natural rival of a head: a head also acts only above `tau`, and much of what RL gains on
small models is sharpening.

    arm = Arm("gate", model, decision_argmax(tau=1.2))      # transformers' generate (steer.pipeline.evaluation.Arm)

    llm = LLM(model, logits_processors=[VllmDecisionArgmax])  # vLLM: requests with extra_args {GATE_KEY: tau}
    decoder = VllmDecoder(llm, tokenizer, model, extra_args={GATE_KEY: 1.2})

In vLLM each request draws from its own seeded generator, step by step, so a gated decode and a plain one with the
same seed share their random draws until the gate first forces a different token: the arms are paired as tightly as
two decodes can be. Used by `benches/paper_table_gsm8k.py`; `benches/gate_steps.py` counts its steps after the fact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from steer.functional import entropy_topk
from steer.pipeline.decoding import ProcessorFactory
from steer.pipeline.folders.predictions import PredictionFolder

try:  # the vLLM processor's base; the transformers one needs no vLLM
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as VllmLogitsProcessor
except ImportError:
    VllmLogitsProcessor = object

GATE_KEY = "steer_gate_tau"  # SamplingParams.extra_args key: the gate of a request, in nats


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
        forced, gated = force_top1(scores, self.tau)
        self._gated.append(gated.cpu())
        return forced

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gated, changed)` of shape `(rows, steps)`: the steps the gate forced, and (none) where that changed the
        top-1, which taking the top-1 never does."""
        if not self._gated:
            return torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, 0, dtype=torch.bool)
        gated = torch.stack(self._gated, dim=1)
        return gated, torch.zeros_like(gated)

    def close(self) -> None:
        self._gated = []


def recorded_tau(folder: Path) -> float:
    """The gate's tau as a decode folder recorded it (its `gate` arm's `extra_args`)."""
    return PredictionFolder(folder).recorded_settings()["arms"]["gate"]["extra_args"][GATE_KEY]


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` share: where a gated decode and its paired plain one part."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decision_argmax(tau: float) -> ProcessorFactory:
    """The factory of [`DecisionArgmax`] processors for evaluation arms."""
    return lambda batch: DecisionArgmax(tau)


def force_top1(scores: torch.Tensor, tau: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` with every row whose entropy exceeds `tau` (one per row, or one for all) put on its top-1 token, and
    the gated rows."""
    stats = entropy_topk(scores, 1)
    gated = stats.entropy > tau
    forced = torch.full_like(scores, float("-inf")).scatter_(1, stats.indices[:, :1], 0.0)
    return torch.where(gated.unsqueeze(1), forced, scores), gated


class VllmDecisionArgmax(VllmLogitsProcessor):
    """The same gate as a vLLM (V1 model runner) logits processor, for the requests whose `extra_args` hold a
    [`GATE_KEY`]; the others pass through. Like every vLLM logits processor it runs on the model's logits before the
    sampler's temperature and top-p."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.taus: dict[int, float] = {}  # persistent-batch row -> gate

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what sampling draws

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.taus.pop(index, None)
        for index, params, _, _ in batch_update.added:
            tau = (params.extra_args or {}).get(GATE_KEY)
            self.taus.pop(index, None)
            if tau is not None:
                self.taus[index] = float(tau)
        for source, target, direction in batch_update.moved:
            moving, swapped = self.taus.pop(source, None), self.taus.pop(target, None)
            if moving is not None:
                self.taus[target] = moving
            if direction == MoveDirectionality.SWAP and swapped is not None:
                self.taus[source] = swapped

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.taus:
            return logits
        tau = torch.full((logits.shape[0],), float("inf"), device=logits.device)
        for row, value in self.taus.items():
            if row < logits.shape[0]:
                tau[row] = value
        return force_top1(logits, tau)[0]
