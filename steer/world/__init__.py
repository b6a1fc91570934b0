"""The built-in reasoning world: a problem generator, the small base model shipped with the package (`assets/`),
its character tokenizer, and `steer demo`, which runs the whole method on it.

`from steer import world` gives the generator's API (`world.problems`, `world.model_path`, ...); the demo lives in
:mod:`steer.world.demo`.
"""

from steer.world.generator import (
    ALPHABET,
    INSTRUCTION,
    LIST_LENGTH,
    MODEL_DIR,
    SLOPPY_WEIGHT,
    TEST_SHARE,
    WorldProblem,
    model_path,
    problems,
    sloppy_greater,
    solution,
    write_benchmark,
)

__all__ = [
    "ALPHABET",
    "INSTRUCTION",
    "LIST_LENGTH",
    "MODEL_DIR",
    "SLOPPY_WEIGHT",
    "TEST_SHARE",
    "WorldProblem",
    "model_path",
    "problems",
    "sloppy_greater",
    "solution",
    "write_benchmark",
]
