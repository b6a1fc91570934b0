"""Step 5 (optional): choose a head's strength by what it does when decoding, on held-out problems.

Training chooses the strength by an off-policy estimate on held-out decision points (the held-out gain), which reads
the rollouts' own tokens; what a head does to whole decodes can differ (on Qwen2.5-0.5B and word problems the
held-out gain grew with strength while accuracy did not move). [`tune_strength`] decodes held-out problems (never
the ones you report) with the base model and with the head at each strength, and keeps the smallest strength whose
accuracy is within one standard error (over problems) of the best, strength 0, the base model, among them: a head
that helps no more than that is switched off. (No null margin as in training: decoded accuracy is measured on the
problems themselves, not estimated off-policy, and its standard error over problems is already wide.)

The decodes go to an evaluation folder (arms `base`, `x0.5`, `x1`, ...; an interrupted run resumes), the result to
`tune.json` beside it, and the head with the strength kept to `OUT/head`.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.pipeline.decoding import Decoder, steering
from steer.pipeline.distributed import Workers
from steer.pipeline.evaluation import Arm, evaluate, head_digest
from steer.pipeline.folders.predictions import PredictionFolder
from steer.pipeline.metrics import Estimate, select_within_one_se
from steer.pipeline.problems import Problem
from steer.settings import TuneSettings

TUNE_FILE = "tune.json"
HEAD_DIR = "head"


@dataclass(frozen=True)
class StrengthOutcome:
    """One strength on the held-out problems: its `accuracy` (mean over problems of each problem's share of right
    decodes) with its `standard_error` over problems, and the paired test against base (`difference`, `p_value`;
    `None` for base itself)."""

    scale: float
    accuracy: float
    standard_error: float
    difference: float | None
    p_value: float | None


@dataclass(frozen=True)
class TuneResult:
    """The strengths tried, base (strength 0) first, the `scale` kept, and where the tuned head went."""

    problems: int
    outcomes: list[StrengthOutcome]
    scale: float
    head: str

    @property
    def switched_off(self) -> bool:
        return self.scale == 0.0


def arm_name(scale: float) -> str:
    return "base" if scale == 0.0 else f"x{scale:g}"


def strength_arms(model: PreTrainedModel | Decoder, head: CorrectionHead, scales: tuple[float, ...],
                  steered: Decoder | None = None) -> list[Arm]:
    """The base arm and one arm per strength: with transformers (`model`), a steering processor per strength; with a
    steered vLLM engine (`steered`, its decoder with steering on), the engine's strength set per arm."""
    arms = [Arm("base", model)]
    for scale in sorted(scales):
        at = copy.deepcopy(head)
        at.scale = scale
        if steered is not None:
            arms.append(Arm(arm_name(scale), replace(steered, strength=scale), digest=head_digest(at), tau=at.tau))
        else:
            arms.append(Arm(arm_name(scale), model, steering(model, at), head_digest(at), at.tau))
    return arms


def tune_strength(
    model: PreTrainedModel | Decoder,
    tokenizer: PreTrainedTokenizerBase,
    head: CorrectionHead,
    benchmarks: dict[str, list[Problem]],
    out_dir: str | os.PathLike,
    settings: TuneSettings = TuneSettings(),
    *,
    steered: Decoder | None = None,
    workers: Workers = Workers(),
    progress: bool = True,
) -> TuneResult | None:
    """Decode `benchmarks` (held-out problems) with the base model and the head at each of `settings.scales`, keep
    the strength the one-standard-error rule picks (see the module docstring), and save the head with it.

    Args:
        model (`PreTrainedModel` or [`Decoder`]), tokenizer: the base model, or its engine (then `steered` is the
            same engine's steered decoder).
        head ([`CorrectionHead`]): the head to tune (not changed; a copy is saved).
        benchmarks (`dict[str, list[Problem]]`): held-out problems by benchmark label.
        out_dir (`str` or `os.PathLike`): the evaluation folder; `tune.json` and `head/` go into it.

    Returns:
        [`TuneResult`] in the main process, `None` in the others.

    Example:

    ```python
    >>> held_out = {"val": load_problems("val.jsonl")}  # doctest: +SKIP
    >>> result = tune_strength(model, tokenizer, head, held_out, "runs/tune")  # doctest: +SKIP
    >>> result.scale, result.switched_off  # doctest: +SKIP
    ```
    """
    arms = strength_arms(model, head, settings.scales, steered)
    summary = evaluate(model, tokenizer, benchmarks, out_dir, settings, arms=arms, workers=workers,
                       progress=progress)
    if summary is None:
        return None
    scores: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in PredictionFolder(out_dir).records():
        scores[record.arm][record.benchmark, record.problem_id].append(float(record.correct))
    outcomes = []
    for scale in [0.0, *sorted(settings.scales)]:
        name = arm_name(scale)
        per_problem = [sum(v) / len(v) for v in scores[name].values()]
        mean = sum(per_problem) / len(per_problem)
        spread = sum((v - mean) ** 2 for v in per_problem) / (len(per_problem) - 1) if len(per_problem) > 1 else 0.0
        paired = [bench.paired[name] for bench in summary.benchmarks.values() if name in bench.paired]
        outcomes.append(StrengthOutcome(scale, mean, (spread / len(per_problem)) ** 0.5,
                                        paired[0].difference if len(paired) == 1 else None,
                                        paired[0].p_value if len(paired) == 1 else None))
    chosen = outcomes[select_within_one_se([Estimate(o.accuracy, o.standard_error) for o in outcomes])].scale
    tuned = copy.deepcopy(head)
    tuned.scale = chosen
    head_dir = Path(out_dir) / HEAD_DIR
    tuned.save_pretrained(head_dir)
    result = TuneResult(problems=len(next(iter(scores.values()))), outcomes=outcomes, scale=chosen,
                        head=str(head_dir))
    atomic_write_json(Path(out_dir) / TUNE_FILE, asdict(result))
    return result
