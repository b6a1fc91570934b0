"""The summary of an evaluation: per benchmark and arm, accuracy with a 95% interval, the unbiased pass@k and the
steering counters; per benchmark, a paired test of every other arm against base; and the run's throughput.

Typed results, converted to JSON only at the edge ([`EvalSummary.to_json`], [`EvalSummary.from_json`]).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from steer.pipeline.metrics import bootstrap_interval, mcnemar, paired_permutation, pass_at_k, wilson_interval
from steer.pipeline.progress import Throughput


class Prediction(Protocol):
    """What a summary reads of a graded decode: the evaluation folder's `PredictionRecord` has it (that folder
    writes this summary beside its records, so the summary names the fields it reads instead of importing it)."""

    @property
    def benchmark(self) -> str: ...
    @property
    def problem_id(self) -> str: ...
    @property
    def arm(self) -> str: ...
    @property
    def correct(self) -> bool: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def gated(self) -> int: ...
    @property
    def changed(self) -> int: ...

PASS_AT = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class ArmSummary:
    """One arm on one benchmark.

    Attributes:
        problems (`int`), predictions (`int`): problems decoded, and decodes in all.
        accuracy (`float`): pass@1 averaged over samples. interval_95 (`tuple[float, float]`): Wilson interval for
            one sample per problem, else a bootstrap over problems.
        mean_tokens (`float`), truncated (`float`): mean generated tokens; share of decodes that ran out of tokens.
        gated_fraction (`float`), changed_fraction (`float`): shares of all steps where the arm's processor acted,
            and where that changed the top-1 token.
        pass_at_k (`dict[str, float]`): the unbiased pass@k for k up to the samples per problem (empty for one).
    """

    problems: int
    predictions: int
    accuracy: float
    interval_95: tuple[float, float]
    mean_tokens: float
    truncated: float
    gated_fraction: float
    changed_fraction: float
    pass_at_k: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairedTest:
    """An arm (steered, another model) against base on the problems both decoded: `difference` in accuracy (arm -
    base) and the two-sided `p_value` of `test` (exact McNemar for one sample per problem, which also counts the
    problems `gained` and `lost`; a sign-flip permutation test of per-problem scores otherwise)."""

    test: str
    problems: int
    difference: float
    p_value: float
    gained: int | None = None
    lost: int | None = None

    def figures(self) -> str:
        """The difference and the test in words, for example `+0.030 (mcnemar p = 0.508, 3 gained, 6 lost)`."""
        detail = f", {self.gained} gained, {self.lost} lost" if self.gained is not None else ""
        return f"{self.difference:+.3f} ({self.test} p = {self.p_value:.3g}{detail})"

    def verdict(self, alpha: float = 0.05) -> str:
        """The comparison in words, plain about a head that hurts."""
        if self.difference < 0:
            worse = "significantly " if self.p_value < alpha else ""
            return f"steering HURT: steered is {worse}below base ({self.difference:+.3f}); do not use this head"
        if self.difference > 0 and self.p_value < alpha:
            return f"steering helped ({self.difference:+.3f}, p = {self.p_value:.3g})"
        return f"no difference we can tell from noise ({self.difference:+.3f}, p = {self.p_value:.3g})"


@dataclass(frozen=True)
class BenchmarkSummary:
    """The arms of one benchmark, and the paired test of each arm other than `base` against it, by arm name (empty
    without a `base` arm)."""

    arms: dict[str, ArmSummary]
    paired: dict[str, PairedTest] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStats(Throughput):
    """What one `evaluate` call decoded: `tokens` in `seconds` (the slowest process's) over `processes`."""

    processes: int = 1


@dataclass(frozen=True)
class EvalSummary:
    """The summary of an evaluation folder (see the module docstring); `run` is absent from [`summarize`]'s."""

    samples: int
    benchmarks: dict[str, BenchmarkSummary]
    run: RunStats | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.run is not None:
            data["run"]["tokens_per_second"] = self.run.tokens_per_second
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalSummary:
        benchmarks = {
            name: BenchmarkSummary(
                arms={arm: ArmSummary(**{**a, "interval_95": tuple(a["interval_95"])}) for arm, a in b["arms"].items()},
                paired={arm: PairedTest(**test) for arm, test in _paired_by_arm(b.get("paired")).items()},
            )
            for name, b in data["benchmarks"].items()
        }
        run = data.get("run")
        run = RunStats(run["tokens"], run["seconds"], run["processes"]) if run else None
        return cls(samples=data["samples"], benchmarks=benchmarks, run=run)


def _paired_by_arm(paired: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """`paired` of a summary.json: by arm, or (written before every arm was paired) the steered arm's test."""
    if paired and "test" in paired:
        return {"steered": paired}
    return paired or {}


def summarize(predictions: Sequence[Prediction], samples: int) -> EvalSummary:
    """The summary of a set of graded decodes (an evaluation folder's `PredictionRecord`s).

    Example:

    ```python
    >>> from steer.pipeline.folders.predictions import PredictionRecord
    >>> records = [PredictionRecord("b", str(i), "base", 0, "", None, "1", i < 3, "stop", 10, 0, 0) for i in range(4)]
    >>> summarize(records, samples=1).benchmarks["b"].arms["base"].accuracy
    0.75
    ```
    """
    grouped: dict[str, dict[str, dict[str, list[Prediction]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for record in predictions:
        grouped[record.benchmark][record.arm][record.problem_id].append(record)
    benchmarks = {}
    for name, arms in grouped.items():
        paired = {arm: _paired(arms["base"], by_problem, samples) for arm, by_problem in arms.items()
                  if arm != "base" and "base" in arms}
        benchmarks[name] = BenchmarkSummary(
            arms={arm: _arm_summary(by_problem, samples) for arm, by_problem in arms.items()}, paired=paired)
    return EvalSummary(samples=samples, benchmarks=benchmarks)


def _arm_summary(by_problem: Mapping[str, list[Prediction]], samples: int) -> ArmSummary:
    correct = {pid: sum(bool(r.correct) for r in records) for pid, records in by_problem.items()}
    counts = {pid: len(records) for pid, records in by_problem.items()}
    scores = [correct[pid] / counts[pid] for pid in by_problem]
    records = [r for rs in by_problem.values() for r in rs]
    steps = sum(r.steps for r in records)
    interval = (wilson_interval(sum(correct.values()), len(records)) if samples == 1
                else bootstrap_interval(scores))
    ks = [k for k in PASS_AT if k <= min(counts.values())] if samples > 1 else []
    return ArmSummary(
        problems=len(by_problem),
        predictions=len(records),
        accuracy=sum(scores) / len(scores),
        interval_95=(interval[0], interval[1]),
        mean_tokens=steps / len(records),
        truncated=sum(r.finish_reason == "length" for r in records) / len(records),
        gated_fraction=sum(r.gated for r in records) / steps if steps else 0.0,
        changed_fraction=sum(r.changed for r in records) / steps if steps else 0.0,
        pass_at_k={
            str(k): sum(pass_at_k(counts[pid], correct[pid], k) for pid in by_problem) / len(by_problem) for k in ks
        },
    )


def _paired(base: Mapping[str, list[Prediction]], other: Mapping[str, list[Prediction]],
            samples: int) -> PairedTest:
    shared = sorted(base.keys() & other.keys())
    if samples == 1:
        outcome = {arm: [bool(records[pid][0].correct) for pid in shared] for arm, records in
                   (("base", base), ("other", other))}
        test = mcnemar(outcome["base"], outcome["other"])
        difference = (sum(outcome["other"]) - sum(outcome["base"])) / len(shared) if shared else 0.0
        return PairedTest("mcnemar", len(shared), difference, test.p_value, test.gained, test.lost)
    score = {arm: [sum(bool(r.correct) for r in records[pid]) / len(records[pid]) for pid in shared]
             for arm, records in (("base", base), ("other", other))}
    permutation = paired_permutation(score["base"], score["other"])
    return PairedTest("paired sign-flip permutation", len(shared), permutation.difference, permutation.p_value)
