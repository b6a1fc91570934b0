"""Judging a head: batch decoding of benchmarks with the base model and the steered model side by side, graded.

With a head, every (problem, sample) is decoded twice, arm `base` and arm `steered`, in the same batch with the
same seed, so that a difference between the arms is the head's doing. Other arms (another model, another logits
processor: see [`Arm`]) are decoded the same way. Outputs, under the run's folder:

- `predictions.jsonl`: one record per (benchmark, problem, arm, sample), appended as batches finish, so an
  interrupted run resumes where it stopped;
- `summary.json`: the [`EvalSummary`] (:mod:`steer.pipeline.summary`);
- with `trace_top_k`, `traces/`: each decode's per-step trace ([`StepTrace`]: base entropy, gating, base top-k
  and the steered probabilities), written with its batch, which `steer view --run` renders.

The folder's format is :mod:`steer.pipeline.folders.predictions`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from safetensors.torch import save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.head import CorrectionHead
from steer.pipeline.decoding import (
    Completion,
    Decoder,
    ProcessorFactory,
    batches_by_length,
    decode_units,
    run_settings,
    steering,
)
from steer.pipeline.distributed import Workers
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord, StepTrace
from steer.pipeline.grading import extract_answer, grade
from steer.pipeline.jobs import Job, Work, run_job
from steer.pipeline.problems import Problem
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.summary import EvalSummary, RunStats, summarize
from steer.pipeline.tracing import Tracer, token_texts
from steer.settings import EvalSettings


@dataclass(frozen=True)
class Arm:
    """One way of decoding the problems: a model (sharing the base model's tokenizer) and an optional processor.

    Attributes:
        name (`str`): the arm's label in the predictions and the summary.
        model (`PreTrainedModel` or [`Decoder`]): the model that decodes, or an engine that decodes with it.
        processor ([`ProcessorFactory`], *optional*): builds a logits processor per batch.
        digest (`str`, *optional*): identifies the processor's settings, so that a resumed run cannot change them.
        tau (`float`, *optional*): the processor's gate threshold, recorded with traces.
    """

    name: str
    model: PreTrainedModel | Decoder
    processor: ProcessorFactory | None = None
    digest: str | None = None
    tau: float | None = None

    @classmethod
    def steered(cls, model: PreTrainedModel, head: CorrectionHead, name: str = "steered") -> Arm:
        return cls(name, model, steering(model, head), head_digest(head), head.tau)

    def describe(self) -> dict:
        return {**run_settings(self.model), "processor": self.digest}


@dataclass(frozen=True)
class _Unit:
    benchmark: str
    problem: Problem
    sample: int


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmarks: Mapping[str, Sequence[Problem]],
    out_dir: str | os.PathLike,
    settings: EvalSettings = EvalSettings(),
    *,
    head: CorrectionHead | None = None,
    arms: Sequence[Arm] | None = None,
    workers: Workers = Workers(),
    progress: bool = True,
    trace_top_k: int | None = None,
) -> EvalSummary | None:
    """Decode and grade every problem of `benchmarks`, base and (with `head`) steered, into `out_dir`.

    Args:
        model (`PreTrainedModel` or [`Decoder`]), tokenizer (`PreTrainedTokenizerBase`): the base model (an engine
            decoding with it only with explicit `arms`).
        benchmarks (`Mapping[str, Sequence[Problem]]`): problems by benchmark label.
        out_dir (`str` or `os.PathLike`): where `predictions.jsonl` and `summary.json` go; a run there is resumed.
        settings ([`EvalSettings`]): decoding settings; they must match those of an existing run.
        head ([`CorrectionHead`], *optional*): adds the `steered` arm.
        arms (`Sequence[Arm]`, *optional*): decode these arms instead of `base` (and `steered`).
        workers ([`Workers`], *optional*): this process's share when several run the job (`accelerate launch`).
        progress (`bool`, defaults to `True`): show a progress bar with tokens per second.
        trace_top_k (`int`, *optional*): record each decode's per-step trace with this many base candidates per
            step into `out_dir/traces/` (see :mod:`steer.pipeline.folders.predictions`). Tracing does not change
            the decodes, so it is not part of the settings a resumed run is checked against; a run resumed with it
            traces only the decodes it makes.

    Returns:
        [`EvalSummary`] (also written to `out_dir/summary.json`) in the main process; `None` in the others.

    Example:

    ```python
    >>> benchmarks = {"gsm8k": load_problems("gsm8k.jsonl")}  # doctest: +SKIP
    >>> summary = evaluate(model, tokenizer, benchmarks, "runs/eval", head=head)  # doctest: +SKIP
    >>> summary.benchmarks["gsm8k"].arms["steered"].accuracy  # doctest: +SKIP
    ```
    """
    folder = PredictionFolder(out_dir)
    if arms is None:
        arms = [Arm("base", model)] + ([Arm.steered(model, head)] if head is not None else [])
    elif head is not None:
        raise ValueError("pass either a head or the arms, not both")
    prompts = {
        (name, p.id): encode_prompt(tokenizer, build_prompt(tokenizer, p.question, settings.instruction))
        for name, problems in benchmarks.items() for p in problems
    }

    if trace_top_k is not None and any(isinstance(arm.model, Decoder) for arm in arms):
        raise ValueError("traces are recorded in transformers' generate: evaluate with the model, not an engine")

    def work(batch: list[_Unit]) -> Work[PredictionRecord]:
        keys = [(u.benchmark, u.problem.id, u.sample) for u in batch]
        ids = [prompts[u.benchmark, u.problem.id] for u in batch]
        records, tokens = [], 0
        for arm in arms:
            tracer = Tracer(arm.processor, trace_top_k) if trace_top_k is not None else None
            completions = decode_units(arm.model, tokenizer, ids, settings.decoding, settings.seed, keys,
                                       tracer or arm.processor)
            if tracer is not None:
                _write_traces(folder, tokenizer, batch, arm, tracer.traces(completions))
            records += [_record(u, arm.name, c) for u, c in zip(batch, completions)]
            tokens += sum(c.steps for c in completions)
        return Work(records, len(batch) * len(arms), tokens)

    job = Job(
        label="eval", unit="seq", folder=folder, settings={
            "arms": {arm.name: arm.describe() for arm in arms}, **asdict(settings),
            "benchmarks": {name: [p.id for p in problems] for name, problems in benchmarks.items()},
        },
        units=[_Unit(name, p, s) for name, problems in benchmarks.items() for p in problems
               for s in range(settings.samples)],
        unit_keys=lambda u: [(u.benchmark, u.problem.id, arm.name, u.sample) for arm in arms],
        batches=lambda pending: batches_by_length(
            pending, [len(prompts[u.benchmark, u.problem.id]) for u in pending], settings.batch_size),
        work=work, items_per_unit=len(arms),
    )
    result = run_job(job, workers, progress)
    if not workers.is_main:
        return None
    totals = result.totals
    summary = summarize(result.records, settings.samples)
    summary = EvalSummary(summary.samples, summary.benchmarks, RunStats(totals.tokens, totals.seconds, workers.world))
    folder.write_summary(summary)
    return summary


def head_digest(head: CorrectionHead) -> str:
    """A short content hash of a head's weights, gating and strength, so a resumed run cannot switch heads."""
    weights = save({name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()})
    return hashlib.sha256(weights + repr((head.tau, head.top_k, head.scale)).encode()).hexdigest()[:16]


def _write_traces(folder: PredictionFolder, tokenizer: PreTrainedTokenizerBase, batch: list[_Unit], arm: Arm,
                  traces: list[StepTrace]) -> None:
    keys = [(u.benchmark, u.problem.id, arm.name, u.sample) for u in batch]
    folder.write_traces(keys, traces, [u.problem.question for u in batch], token_texts(tokenizer, traces), arm.tau)


def _record(unit: _Unit, arm: str, completion: Completion) -> PredictionRecord:
    return PredictionRecord(
        benchmark=unit.benchmark, problem_id=unit.problem.id, arm=arm, sample=unit.sample,
        completion=completion.text, answer=extract_answer(completion.text), gold=unit.problem.gold,
        correct=grade(completion.text, unit.problem.gold), finish_reason=completion.finish_reason,
        steps=completion.steps, gated=completion.gated, changed=completion.changed,
    )
