"""steer: the reasoning gains of RL without RL, by steering a language model's decision points at decoding time.

Data flow: rollouts -> teacher-forced scores -> decision points (entropy > tau) -> correction head -> steered decoding.
"""

from steer.demo import DemoResult, DemoSettings, run_demo
from steer.functional import entropy_topk, steer_logits
from steer.generation import generate
from steer.grading import answers_match, extract_answer, grade
from steer.head import CorrectionHead, HeadConfig, HeadMismatchError
from steer.problems import Problem, ProblemFileError, load_problems
from steer.processor import SteeringError, SteeringProcessor, SteeringStats
from steer.reference import EntropyTopK, SteeredLogits
from steer.version import __version__
from steer.world import model_path as world_model

__all__ = [
    "CorrectionHead",
    "DemoResult",
    "DemoSettings",
    "EntropyTopK",
    "HeadConfig",
    "HeadMismatchError",
    "Problem",
    "ProblemFileError",
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
