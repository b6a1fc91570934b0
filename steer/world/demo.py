"""The whole method in one call: rollouts on training problems, scoring, a trained head, and a held-out evaluation
of the base model against the steered one.

On the built-in world (the default) it runs in a few minutes on a laptop CPU; given a model and a benchmark file it
runs the same loop there, splitting the benchmark's problems into a training part and a held-out test part.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from steer import world
from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.distributed import Workers
from steer.pipeline.evaluation import EvalSettings, evaluate
from steer.pipeline.problems import Problem, load_problems
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import ScoreSettings, score_rollouts
from steer.pipeline.summary import BenchmarkSummary, PairedTest
from steer.pipeline.training import TrainSettings, train_head
from steer.settings import DemoSettings

RESULT_FILE = "demo.json"


@dataclass(frozen=True)
class StageReport:
    """One step of the demo: its `seconds`, and its tokens per second where it decodes or scores (a step finished by
    an earlier run and not redone shows what this run did: nothing)."""

    seconds: float
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it put the files; `stages` times each step."""

    base_accuracy: float
    steered_accuracy: float
    test_problems: int
    paired_test: PairedTest
    gated_fraction: float
    changed_fraction: float
    tau: float
    scale: float
    seconds: float
    head: Path
    out_dir: Path
    model: str
    seed: int
    stages: dict[str, StageReport] = field(default_factory=dict)


def world_problems(settings: DemoSettings) -> tuple[list[Problem], list[Problem]]:
    """Training and test problems of the built-in world (disjoint splits), drawn with the demo's seed."""
    def convert(problems: list[world.WorldProblem]) -> list[Problem]:
        return [Problem(p.id, p.question, str(p.answer), "world") for p in problems]

    return (convert(world.problems("train", settings.train_problems, settings.seed)),
            convert(world.problems("test", settings.test_problems, settings.seed)))


def split_problems(problems: list[Problem], settings: DemoSettings) -> tuple[list[Problem], list[Problem]]:
    """Split a benchmark into training and test problems by a seeded hash of each id: the test part gets
    `test_problems / (train_problems + test_problems)` of them, then each part is cut to its count."""
    share = settings.test_problems / (settings.train_problems + settings.test_problems)

    def in_test(problem: Problem) -> bool:
        digest = hashlib.sha256(f"{settings.seed}:{problem.id}".encode()).digest()
        return int.from_bytes(digest[:4], "big") < share * 2 ** 32

    test = [p for p in problems if in_test(p)]
    train = [p for p in problems if not in_test(p)]
    if not train or not test:
        raise ValueError(f"{len(problems)} problems are too few to split into training and test problems")
    return train[: settings.train_problems], test[: settings.test_problems]


def run_demo(
    out_dir: str | os.PathLike,
    model_name_or_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    settings: DemoSettings | None = None,
    *,
    progress: bool = True,
) -> DemoResult:
    """Run rollouts, scoring, head training and the base-against-steered evaluation into `out_dir`.

    Args:
        out_dir (`str` or `os.PathLike`): `rollouts/` (rollouts and scores), `head/`, `eval/` and `demo.json` go here.
        model_name_or_path (`str` or `os.PathLike`, *optional*): defaults to the built-in world's model.
        data (`str` or `os.PathLike`, *optional*): a benchmark (see [`load_problems`]); required with a model other
            than the world's, whose problems are drawn otherwise.
        settings ([`DemoSettings`], *optional*): defaults to `DemoSettings()` for the world and
            `DemoSettings.for_model()` otherwise.
        progress (`bool`, defaults to `True`): show progress bars.

    Returns:
        [`DemoResult`], also written to `out_dir/demo.json`.

    Example:

    ```python
    >>> result = run_demo("runs/demo")  # doctest: +SKIP
    >>> result.steered_accuracy > result.base_accuracy  # doctest: +SKIP
    True
    ```
    """
    start = time.perf_counter()
    out = Path(out_dir)
    builtin = model_name_or_path is None
    if builtin and data is not None:
        raise ValueError("--data needs --model: the built-in model only knows the built-in world")
    if not builtin and data is None:
        raise ValueError("a model other than the built-in one needs a benchmark (--data) to learn from")
    settings = settings or (DemoSettings() if builtin else DemoSettings.for_model())
    model_path = world.model_path() if builtin else model_name_or_path
    train_problems, test_problems = world_problems(settings) if builtin else split_problems(
        load_problems(data), settings)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(model_path, device=Workers().device)
    decoding = DecodingSettings(max_new_tokens=settings.max_new_tokens)
    rollouts = run_rollouts(model, tokenizer, train_problems, out / "rollouts", RolloutSettings(
        samples=settings.samples, decoding=decoding, batch_size=settings.batch_size, seed=settings.seed,
        instruction=settings.instruction), progress=progress)
    scores = score_rollouts(model, out / "rollouts", ScoreSettings(floor=settings.floor), progress=progress)
    trained = train_head(model, out / "rollouts", _seeded(settings.train, settings.seed), progress=progress)
    trained.save(out / "head")
    summary = evaluate(model, tokenizer, {"test": test_problems}, out / "eval", EvalSettings(
        decoding=decoding, batch_size=settings.batch_size, seed=settings.seed, instruction=settings.instruction,
    ), head=trained.head, progress=progress)
    stages = {
        "rollouts": StageReport(rollouts.seconds, rollouts.tokens_per_second),
        "scoring": StageReport(scores.seconds, scores.tokens_per_second),
        "training": StageReport(trained.record.seconds),
        "evaluation": StageReport(summary.run.seconds, summary.run.tokens_per_second),
    }
    return _result(summary.benchmarks["test"], trained.head, time.perf_counter() - start, out,
                   str(model_path), settings, stages)


def _seeded(train: TrainSettings, seed: int) -> TrainSettings:
    return TrainSettings(**{**asdict(train), "seed": seed})


def _result(summary: BenchmarkSummary, head: CorrectionHead, seconds: float, out: Path, model: str,
            settings: DemoSettings, stages: dict[str, StageReport]) -> DemoResult:
    base, steered = summary.arms["base"], summary.arms["steered"]
    result = DemoResult(
        base_accuracy=base.accuracy, steered_accuracy=steered.accuracy, test_problems=steered.problems,
        paired_test=summary.paired["steered"], gated_fraction=steered.gated_fraction,
        changed_fraction=steered.changed_fraction,
        tau=head.tau, scale=head.scale, seconds=seconds, head=out / "head", out_dir=out, model=model,
        seed=settings.seed, stages=stages,
    )
    atomic_write_json(out / RESULT_FILE, {**asdict(result), "head": str(result.head), "out_dir": str(out),
                                          "settings": asdict(settings)})
    return result
