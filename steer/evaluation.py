"""Judging a head: batch decoding of benchmarks with the base model and the steered model side by side, graded.

With a head, every (problem, sample) is decoded twice, arm `base` and arm `steered`, in the same batch with the
same seed, so that a difference between the arms is the head's doing. Other arms (another model, another logits
processor: see [`Arm`]) are decoded the same way. Outputs, under the run's folder:

- `predictions.jsonl`: one record per (benchmark, problem, arm, sample), appended as batches finish, so an
  interrupted run resumes where it stopped;
- `summary.json`: per benchmark and arm, accuracy (pass@1, averaged over samples) with a 95% interval, the unbiased
  pass@k, the steering counters; per benchmark a paired test of steered against base; throughput.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.decoding import (
    Completion,
    DecodingSettings,
    ProcessorFactory,
    batches_by_length,
    decode_batch,
    derive_seed,
    steering,
)
from steer.distributed import Workers, job_totals, merge_parts, open_store
from steer.grading import extract_answer, grade
from steer.head import CorrectionHead
from steer.metrics import bootstrap_interval, mcnemar, paired_permutation, pass_at_k, wilson_interval
from steer.problems import Problem
from steer.progress import ThroughputBar
from steer.prompts import DEFAULT_INSTRUCTION, build_prompt, encode_prompt
from steer.store import atomic_write_json, check_settings, read_jsonl

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "eval.settings.json"
KEY = ("benchmark", "problem_id", "arm", "sample")


@dataclass(frozen=True)
class EvalSettings:
    """How benchmarks are decoded (defaults: the paper's evaluation, temperature 0.6 and top-p 0.95).

    Attributes:
        samples (`int`, defaults to 1): decodes per problem and arm (avg@n and pass@k when above 1).
        decoding ([`DecodingSettings`]): temperature (0 is greedy), top-p, length budget.
        batch_size (`int`, defaults to 16), seed (`int`, defaults to 0), instruction (`str`): as for rollouts.
    """

    samples: int = 1
    decoding: DecodingSettings = field(default_factory=lambda: DecodingSettings(max_new_tokens=4096))
    batch_size: int = 16
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class Arm:
    """One way of decoding the problems: a model (sharing the base model's tokenizer) and an optional processor.

    Attributes:
        name (`str`): the arm's label in the predictions and the summary.
        model (`PreTrainedModel`): the model that decodes.
        processor ([`ProcessorFactory`], *optional*): builds a logits processor per batch.
        digest (`str`, *optional*): identifies the processor's settings, so that a resumed run cannot change them.
    """

    name: str
    model: PreTrainedModel
    processor: ProcessorFactory | None = None
    digest: str | None = None

    @classmethod
    def steered(cls, model: PreTrainedModel, head: CorrectionHead, name: str = "steered") -> Arm:
        return cls(name, model, steering(model, head), _head_digest(head))

    def describe(self) -> dict:
        return {"model": self.model.name_or_path, "processor": self.digest}


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
) -> dict:
    """Decode and grade every problem of `benchmarks`, base and (with `head`) steered, into `out_dir`.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the base model.
        benchmarks (`Mapping[str, Sequence[Problem]]`): problems by benchmark label.
        out_dir (`str` or `os.PathLike`): where `predictions.jsonl` and `summary.json` go; a run there is resumed.
        settings ([`EvalSettings`]): decoding settings; they must match those of an existing run.
        head ([`CorrectionHead`], *optional*): adds the `steered` arm.
        arms (`Sequence[Arm]`, *optional*): decode these arms instead of `base` (and `steered`).
        workers ([`Workers`], *optional*): this process's share when several run the job (`accelerate launch`).
        progress (`bool`, defaults to `True`): show a progress bar with tokens per second.

    Returns:
        The summary (also written to `out_dir/summary.json` by the main process; other processes get `{}`).

    Example:

    ```python
    >>> benchmarks = {"gsm8k": load_problems("gsm8k.jsonl")}  # doctest: +SKIP
    >>> summary = evaluate(model, tokenizer, benchmarks, "runs/eval", head=head)  # doctest: +SKIP
    >>> summary["benchmarks"]["gsm8k"]["steered"]["accuracy"]  # doctest: +SKIP
    ```
    """
    out = Path(out_dir)
    path = out / PREDICTIONS_FILE
    if arms is None:
        arms = [Arm("base", model)] + ([Arm.steered(model, head)] if head is not None else [])
    elif head is not None:
        raise ValueError("pass either a head or the arms, not both")
    if workers.is_main:
        check_settings(out / SETTINGS_FILE, {
            "arms": {arm.name: arm.describe() for arm in arms}, **asdict(settings),
            "benchmarks": {name: [p.id for p in problems] for name, problems in benchmarks.items()},
        })
    store, existing = open_store(path, KEY, workers)
    done = {store.key(record) for record in existing}
    prompts = {
        (name, p.id): encode_prompt(tokenizer, build_prompt(tokenizer, p.question, settings.instruction))
        for name, problems in benchmarks.items() for p in problems
    }
    units = [
        _Unit(name, p, s) for name, problems in benchmarks.items() for p in problems for s in range(settings.samples)
        if any((name, p.id, arm.name, s) not in done for arm in arms)
    ]
    batches = list(batches_by_length(units, [len(prompts[u.benchmark, u.problem.id]) for u in units],
                                     settings.batch_size))
    mine = workers.share(batches)
    bar = ThroughputBar(sum(map(len, mine)) * len(arms), "eval", "seq", progress and workers.is_main)
    for batch in mine:
        seed = derive_seed(settings.seed, *((u.benchmark, u.problem.id, u.sample) for u in batch))
        ids = [prompts[u.benchmark, u.problem.id] for u in batch]
        for arm in arms:
            completions = decode_batch(arm.model, tokenizer, ids, settings.decoding, seed, arm.processor)
            store.extend([_record(u, arm.name, c) for u, c in zip(batch, completions)])
            bar.advance(len(completions), sum(c.steps for c in completions))
    bar.close()
    totals = job_totals(workers, bar)
    merge_parts(path, KEY, workers)
    if not workers.is_main:
        return {}
    summary = summarize(list(read_jsonl(path, KEY)), settings.samples)
    seconds = totals["seconds"]
    summary["run"] = {"seconds": seconds, "new_tokens": totals["tokens"], "processes": workers.world,
                      "tokens_per_second": totals["tokens"] / seconds if seconds > 0 else 0.0}
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _head_digest(head: CorrectionHead) -> str:
    """A short content hash of a head's weights, gating and strength, so a resumed run cannot switch heads."""
    weights = save({name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()})
    return hashlib.sha256(weights + repr((head.tau, head.top_k, head.scale)).encode()).hexdigest()[:16]


def _record(unit: _Unit, arm: str, completion: Completion) -> dict:
    return {
        "benchmark": unit.benchmark,
        "problem_id": unit.problem.id,
        "arm": arm,
        "sample": unit.sample,
        "completion": completion.text,
        "answer": extract_answer(completion.text),
        "gold": unit.problem.gold,
        "correct": grade(completion.text, unit.problem.gold),
        "finish_reason": completion.finish_reason,
        "steps": completion.steps,
        "gated": completion.gated,
        "changed": completion.changed,
    }


def summarize(predictions: Sequence[dict], samples: int) -> dict:
    """The summary of a set of prediction records (see the module docstring); usable on any `predictions.jsonl`.

    Example:

    ```python
    >>> records = [{"benchmark": "b", "problem_id": str(i), "arm": "base", "sample": 0, "correct": i < 3,
    ...             "steps": 10, "gated": 0, "changed": 0, "finish_reason": "stop"} for i in range(4)]
    >>> summarize(records, samples=1)["benchmarks"]["b"]["base"]["accuracy"]
    0.75
    ```
    """
    grouped: dict[str, dict[str, dict[str, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in predictions:
        grouped[record["benchmark"]][record["arm"]][record["problem_id"]].append(record)
    benchmarks = {}
    for name, arms in grouped.items():
        benchmarks[name] = {arm: _arm_summary(by_problem, samples) for arm, by_problem in arms.items()}
        if "base" in arms and "steered" in arms:
            benchmarks[name]["paired"] = _paired(arms["base"], arms["steered"], samples)
    return {"samples": samples, "benchmarks": benchmarks}


def _arm_summary(by_problem: Mapping[str, list[dict]], samples: int) -> dict:
    correct = {pid: sum(bool(r["correct"]) for r in records) for pid, records in by_problem.items()}
    counts = {pid: len(records) for pid, records in by_problem.items()}
    scores = [correct[pid] / counts[pid] for pid in by_problem]
    records = [r for rs in by_problem.values() for r in rs]
    steps = sum(r["steps"] for r in records)
    interval = (wilson_interval(sum(correct.values()), len(records)) if samples == 1
                else bootstrap_interval(scores))
    summary = {
        "problems": len(by_problem),
        "predictions": len(records),
        "accuracy": sum(scores) / len(scores),
        "interval_95": list(interval),
        "mean_tokens": steps / len(records),
        "truncated": sum(r["finish_reason"] == "length" for r in records) / len(records),
        "gated_fraction": sum(r["gated"] for r in records) / steps if steps else 0.0,
        "changed_fraction": sum(r["changed"] for r in records) / steps if steps else 0.0,
    }
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= min(counts.values())]
    if samples > 1:
        summary["pass_at_k"] = {
            str(k): sum(pass_at_k(counts[pid], correct[pid], k) for pid in by_problem) / len(by_problem) for k in ks
        }
    return summary


def _paired(base: Mapping[str, list[dict]], steered: Mapping[str, list[dict]], samples: int) -> dict:
    shared = sorted(base.keys() & steered.keys())
    if samples == 1:
        outcome = {arm: [bool(records[pid][0]["correct"]) for pid in shared] for arm, records in
                   (("base", base), ("steered", steered))}
        test = mcnemar(outcome["base"], outcome["steered"])
        difference = (sum(outcome["steered"]) - sum(outcome["base"])) / len(shared) if shared else 0.0
        return {"test": "mcnemar", "problems": len(shared), "difference": difference, **test}
    score = {arm: [sum(bool(r["correct"]) for r in records[pid]) / len(records[pid]) for pid in shared]
             for arm, records in (("base", base), ("steered", steered))}
    return {"test": "paired sign-flip permutation", "problems": len(shared),
            **paired_permutation(score["base"], score["steered"])}
