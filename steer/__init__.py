"""steer: the reasoning gains of RL without RL, by steering a language model's decision points at decoding time.

Data flow: rollouts -> teacher-forced scores -> decision points (entropy > tau) -> correction head -> steered decoding.

`import steer` imports nothing heavy: every name below is resolved on first use (`steer.generate` loads the
steering core, torch and transformers; `steer.run_demo` the built-in world and the pipeline). The command line
relies on it to answer `--help` at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from steer.errors import SteerError, SteeringError
from steer.version import __version__

# Names loaded on first access: name -> (module, attribute).
_LAZY = {
    "CorrectionHead": ("steer.head", "CorrectionHead"),
    "HeadConfig": ("steer.head", "HeadConfig"),
    "HeadMismatchError": ("steer.head", "HeadMismatchError"),
    "entropy_topk": ("steer.functional", "entropy_topk"),
    "steer_logits": ("steer.functional", "steer_logits"),
    "generate": ("steer.generation", "generate"),
    "SteeringProcessor": ("steer.processor", "SteeringProcessor"),
    "SteeringStats": ("steer.processor", "SteeringStats"),
    "EntropyTopK": ("steer.reference", "EntropyTopK"),
    "SteeredLogits": ("steer.reference", "SteeredLogits"),
    "DemoResult": ("steer.world.demo", "DemoResult"),
    "DemoSettings": ("steer.settings", "DemoSettings"),
    "run_demo": ("steer.world.demo", "run_demo"),
    "world_model": ("steer.world.generator", "model_path"),
    "Problem": ("steer.pipeline.problems", "Problem"),
    "ProblemFileError": ("steer.pipeline.problems", "ProblemFileError"),
    "load_problems": ("steer.pipeline.problems", "load_problems"),
    "answers_match": ("steer.pipeline.grading", "answers_match"),
    "extract_answer": ("steer.pipeline.grading", "extract_answer"),
    "grade": ("steer.pipeline.grading", "grade"),
}

if TYPE_CHECKING:
    from steer.functional import entropy_topk, steer_logits
    from steer.generation import generate
    from steer.head import CorrectionHead, HeadConfig, HeadMismatchError
    from steer.pipeline.grading import answers_match, extract_answer, grade
    from steer.pipeline.problems import Problem, ProblemFileError, load_problems
    from steer.processor import SteeringProcessor, SteeringStats
    from steer.reference import EntropyTopK, SteeredLogits
    from steer.settings import DemoSettings
    from steer.world.demo import DemoResult, run_demo
    from steer.world.generator import model_path as world_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'steer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CorrectionHead",
    "DemoResult",
    "DemoSettings",
    "EntropyTopK",
    "HeadConfig",
    "HeadMismatchError",
    "Problem",
    "ProblemFileError",
    "SteerError",
    "SteeredLogits",
    "SteeringError",
    "SteeringProcessor",
    "SteeringStats",
    "__version__",
    "answers_match",
    "entropy_topk",
    "extract_answer",
    "generate",
    "grade",
    "load_problems",
    "run_demo",
    "steer_logits",
    "world_model",
]
