"""The paper's causal test: decode with the base model and let another model (the RL model) choose at some steps.

At entropy-gated steps (base entropy above tau) the RL model's top-1 token replaces the base model's choice; the
control substitutes at the same rate at random steps. With the base and RL models alone, four arms are decoded on
the same problems with the same seeds (see [`evaluate`]), and each arm's accuracy gives the share of the RL gain it
recovers: `(accuracy - base) / (rl - base)`. If correcting a few high-entropy decisions is what RL does, the gated
arm recovers most of the gain and the random arm little.

Outputs, under the run's folder: `arms/` (base, rl and gated: an evaluation folder), `random/` (the random arm, at
the gated arm's substitution rate over all benchmarks together) and `intervention.json`, the report.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_json
from steer.functional import entropy_topk
from steer.pipeline.decoding import ProcessorFactory, derive_seed
from steer.pipeline.distributed import Workers
from steer.pipeline.evaluation import Arm, EvalSettings, evaluate
from steer.pipeline.folders.predictions import PredictionFolder
from steer.pipeline.problems import Problem
from steer.pipeline.summary import BenchmarkSummary, PairedTest, summarize
from steer.settings import PAPER_TAU

REPORT_FILE = "intervention.json"


class SubstitutionProcessor(LogitsProcessor):
    """Replaces the base model's next-token distribution with a point mass on another model's top-1 token, at
    entropy-gated steps (`tau`) or at random steps (`rate`).

    The other model runs in lockstep with `generate`, on the same tokens, with its own KV cache: the first call
    feeds the (left-padded) prompts with `attention_mask`, each later call the tokens added since. Works with greedy
    search and sampling (one new token per row and step); not with beam search, which reorders rows.

    Args:
        other (`PreTrainedModel`): the model whose choices are substituted; same tokenizer as the base model.
        attention_mask (`torch.LongTensor` of shape `(batch_size, prompt_length)`): the prompts' mask.
        tau (`float`, *optional*): substitute where the base entropy (nats, of the scores this processor receives)
            exceeds `tau`.
        rate (`float`, *optional*): substitute at each step of each row with this probability instead.
        seed (`int`, defaults to 0): seeds the random steps (a generator of its own: sampling is not disturbed).

    Example:

    ```python
    >>> batch = tokenizer(prompts, return_tensors="pt", padding=True)  # doctest: +SKIP
    >>> processor = SubstitutionProcessor(rl_model, batch["attention_mask"], tau=1.4)  # doctest: +SKIP
    >>> base_model.generate(**batch, logits_processor=LogitsProcessorList([processor]))  # doctest: +SKIP
    >>> gated, changed = processor.row_masks()  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        other: PreTrainedModel,
        attention_mask: torch.Tensor,
        *,
        tau: float | None = None,
        rate: float | None = None,
        seed: int = 0,
    ) -> None:
        if (tau is None) == (rate is None):
            raise ValueError("give exactly one of tau (entropy-gated steps) and rate (random steps)")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], got {rate}")
        self.other, self.tau, self.rate = other, tau, rate
        self._mask = attention_mask.to(other.device)
        self._generator = torch.Generator().manual_seed(seed)
        self._cache = None
        # transformers 5.x calls the KV cache `cache` in forward arguments and outputs, earlier versions
        # `past_key_values`
        self._cache_name = "cache" if "cache" in inspect.signature(other.forward).parameters else "past_key_values"
        self._seen = 0
        self._gated: list[torch.Tensor] = []
        self._changed: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        other_logits = self._advance(input_ids)
        width = min(other_logits.shape[-1], scores.shape[-1])  # vocabularies padded to different sizes
        choice = other_logits[:, :width].argmax(-1).to(scores.device)
        gated = self._gated_rows(scores)
        forced = torch.full_like(scores, float("-inf")).scatter_(1, choice.unsqueeze(1), 0.0)
        self._gated.append(gated.cpu())
        self._changed.append((gated & (choice != scores.argmax(-1))).cpu())
        return torch.where(gated.unsqueeze(1), forced, scores)

    def _gated_rows(self, scores: torch.Tensor) -> torch.Tensor:
        if self.tau is not None:
            return entropy_topk(scores, 1).entropy > self.tau
        draws = torch.rand(scores.shape[0], generator=self._generator)
        return (draws < self.rate).to(scores.device)

    def _advance(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Run the other model over the tokens added since the last call; its last-position logits `[B, V]`."""
        if input_ids.shape[0] != self._mask.shape[0]:
            raise ValueError(f"generate decodes {input_ids.shape[0]} rows but the prompts' mask has "
                             f"{self._mask.shape[0]}: beam search and num_return_sequences are not supported")
        new = input_ids[:, self._seen :].to(self.other.device)
        if self._seen:
            self._mask = torch.cat([self._mask, self._mask.new_ones(new.shape)], dim=1)
        elif self._mask.shape[1] != new.shape[1]:
            raise ValueError(f"the prompts' mask has {self._mask.shape[1]} columns, the prompts {new.shape[1]}")
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        output = self.other(input_ids=new, attention_mask=self._mask, position_ids=positions,
                            **{self._cache_name: self._cache}, use_cache=True)
        self._cache = getattr(output, self._cache_name)
        self._seen = input_ids.shape[1]
        return output.logits[:, -1]

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gated, changed)`, `torch.BoolTensor`s of shape `(batch_size, steps)`: the steps substituted, and those
        where the other model's choice differed from the base model's top-1."""
        if not self._gated:
            empty = torch.zeros(self._mask.shape[0], 0, dtype=torch.bool)
            return empty, empty
        return torch.stack(self._gated, dim=1), torch.stack(self._changed, dim=1)

    def close(self) -> None:
        """Drop the other model's cache."""
        self._cache = None


def substitution(other: PreTrainedModel, *, tau: float | None = None, rate: float | None = None,
                 seed: int = 0) -> ProcessorFactory:
    """The factory of [`SubstitutionProcessor`]s for [`decode_batch`] and evaluation arms. With `rate`, each batch
    draws its random steps from a seed derived from `seed` and the batch's decoding seed (which `decode_batch` sets
    before building the processor), so the draws are the same however work is split and differ between batches."""
    def build(batch: dict[str, torch.Tensor]) -> SubstitutionProcessor:
        batch_seed = derive_seed(seed, torch.initial_seed()) if rate is not None else seed
        return SubstitutionProcessor(other, batch["attention_mask"], tau=tau, rate=rate, seed=batch_seed)

    return build


def recovered_share(base: float, rl: float, arm: float) -> float | None:
    """The share of the RL gain an arm recovers, `(arm - base) / (rl - base)`; `None` where RL gains nothing (its
    accuracy is at or below base's: a share of a loss would read backwards)."""
    return (arm - base) / (rl - base) if rl > base else None


@dataclass(frozen=True)
class ArmOutcome:
    """One arm on one benchmark: its decodes, accuracy, the shares of steps where it substituted (`gated`) and where
    that changed the base top-1 (`changed`), for the substitution arms the share of the RL gain recovered, and for
    every arm but base its [`PairedTest`] against base on the same problems."""

    predictions: int
    accuracy: float
    gated: float
    changed: float
    recovered: float | None = None
    paired: PairedTest | None = None


@dataclass(frozen=True)
class InterventionReport:
    """The intervention's outcome: the entropy gate `tau`, the random arm's substitution rate, and per benchmark
    the [`ArmOutcome`] of each arm (`base`, `rl`, `gated`, `random`)."""

    tau: float
    random_rate: float
    benchmarks: dict[str, dict[str, ArmOutcome]]


def intervene(
    base: PreTrainedModel,
    rl: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmarks: Mapping[str, Sequence[Problem]],
    out_dir: str | os.PathLike,
    settings: EvalSettings = EvalSettings(),
    *,
    tau: float = PAPER_TAU,
    workers: Workers = Workers(),
    progress: bool = True,
) -> InterventionReport | None:
    """Decode `benchmarks` with the base model, the RL model, and the base model with the RL model's choices
    substituted at entropy-gated steps and at as many random steps; report accuracy and the RL gain recovered.

    Args:
        base (`PreTrainedModel`), rl (`PreTrainedModel`): the two models; `tokenizer` is shared.
        benchmarks (`Mapping[str, Sequence[Problem]]`): problems by benchmark label.
        out_dir (`str` or `os.PathLike`): the run's folder (see the module docstring); a run there is resumed.
        settings ([`EvalSettings`]): decoding settings for every arm.
        tau (`float`, defaults to 1.4): the entropy gate (nats).
        workers ([`Workers`], *optional*), progress (`bool`): as for [`evaluate`].

    Returns:
        [`InterventionReport`] (also written to `out_dir/intervention.json`) in the main process, `None` in others.
    """
    out = Path(out_dir)
    digest = f"tau={tau}"
    arms = [Arm("base", base), Arm("rl", rl), Arm("gated", base, substitution(rl, tau=tau), digest)]
    evaluate(base, tokenizer, benchmarks, out / "arms", settings, arms=arms, workers=workers, progress=progress)
    workers.wait()
    rate = substitution_rate(PredictionFolder(out / "arms"), "gated")
    random_arm = Arm("random", base, substitution(rl, rate=rate, seed=settings.seed), f"rate={rate!r}")
    evaluate(base, tokenizer, benchmarks, out / "random", settings, arms=[random_arm], workers=workers,
             progress=progress)
    if not workers.is_main:
        return None
    records = [*PredictionFolder(out / "arms").records(), *PredictionFolder(out / "random").records()]
    summary = summarize(records, settings.samples)  # the random arm paired with base across the two folders
    report = InterventionReport(tau=tau, random_rate=rate, benchmarks={
        name: intervention_rows(summary.benchmarks[name]) for name in benchmarks
    })
    atomic_write_json(out / REPORT_FILE, asdict(report))
    return report


def substitution_rate(folder: PredictionFolder, arm: str) -> float:
    """Gated (substituted) steps over all steps of `arm` in an evaluation folder."""
    records = folder.records(arm)
    steps = sum(r.steps for r in records)
    return sum(r.gated for r in records) / steps if steps else 0.0


def intervention_rows(bench: BenchmarkSummary) -> dict[str, ArmOutcome]:
    """One benchmark's rows from the summary of all its arms: each arm's accuracy and shares of gated and changed
    steps, for the substitution arms the share of the RL gain recovered, and each arm's paired test against base."""
    base, rl = bench.arms["base"].accuracy, bench.arms["rl"].accuracy
    return {
        name: ArmOutcome(
            predictions=a.predictions, accuracy=a.accuracy, gated=a.gated_fraction, changed=a.changed_fraction,
            recovered=recovered_share(base, rl, a.accuracy) if name in ("gated", "random") else None,
            paired=bench.paired.get(name),
        )
        for name, a in bench.arms.items()
    }
