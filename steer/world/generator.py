"""The built-in reasoning world: find the largest of a few numbers by pairwise comparisons.

A problem lists four two-digit numbers; a worked solution walks the list, comparing the number kept so far with the
next one and keeping the larger, then boxes the result:

    Which is largest: 37, 82, 15, 64?
    37<82 so 82. 82>15 so 82. 82>64 so 82. \\boxed{82}

The corpus the base model learns from mixes two writers. A careful writer compares the numbers. A sloppy writer
compares only their last digits (a shortcut that is right about half the time). Where the two agree, every
solution says the same thing; where they disagree, the corpus takes the sloppy branch with probability
`SLOPPY_WEIGHT` (0.55). So the model learns to be unsure at exactly those comparison signs — its decision points —
and there its favourite branch is the wrong one. Which sign is right depends on the two numbers, so no constant
bias can fix it: a correction head has to read the comparison off the hidden state. Everything else in a solution
(copying the kept number, the final box) is determined, so decision points are a few percent of the positions.

Train and test problems are disjoint: a problem belongs to the test split if a hash of its numbers says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from steer.files import atomic_write_text
from steer.settings import WORLD_INSTRUCTION

LIST_LENGTH = 4
SLOPPY_WEIGHT = 0.55
TEST_SHARE = 0.2
ALPHABET = "0123456789<>.,:? {}\\abcdefghijklmnopqrstuvwxyzW"
INSTRUCTION = WORLD_INSTRUCTION
MODEL_DIR = Path(__file__).resolve().parent / "assets" / "world-model"


@dataclass(frozen=True)
class WorldProblem:
    """One problem: the numbers to compare, in order."""

    numbers: tuple[int, ...]

    @property
    def question(self) -> str:
        return f"Which is largest: {', '.join(map(str, self.numbers))}?"

    @property
    def answer(self) -> int:
        return max(self.numbers)

    @property
    def id(self) -> str:
        return "largest-" + "-".join(map(str, self.numbers))

    @property
    def split(self) -> str:
        digest = hashlib.sha256(self.id.encode()).digest()
        return "test" if digest[0] < 256 * TEST_SHARE else "train"


def sloppy_greater(a: int, b: int) -> bool:
    """The sloppy writer's claim that `a > b`: compare last digits, then first digits."""
    return (a % 10, a // 10) > (b % 10, b // 10)


def solution(problem: WorldProblem, rng: random.Random | None = None) -> str:
    """A worked solution as the corpus writes it: the careful comparison where both writers agree, else the sloppy
    one with probability `SLOPPY_WEIGHT` (drawn from `rng`); with no `rng`, always the careful one."""
    kept, steps = problem.numbers[0], []
    for number in problem.numbers[1:]:
        greater = kept > number
        if rng is not None and sloppy_greater(kept, number) != greater and rng.random() < SLOPPY_WEIGHT:
            greater = not greater
        steps.append(f"{kept}{'>' if greater else '<'}{number} so {kept if greater else number}.")
        kept = kept if greater else number
    return " ".join(steps) + f" \\boxed{{{kept}}}"


def problems(split: str, count: int, seed: int = 0) -> list[WorldProblem]:
    """`count` distinct problems of one split ("train" or "test"), drawn with `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    rng, seen, found = random.Random(f"{split}-{seed}"), set(), []
    while len(found) < count:
        problem = WorldProblem(tuple(rng.sample(range(10, 100), LIST_LENGTH)))
        if problem.split == split and problem.numbers not in seen:
            seen.add(problem.numbers)
            found.append(problem)
    return found


def write_benchmark(path: str | os.PathLike, split: str = "test", count: int = 500, seed: int = 0) -> Path:
    """Write `count` problems of `split` as a JSONL benchmark (`id`, `question`, `answer`) that `load_problems`,
    `steer rollout` and `steer eval` read like any other."""
    records = [{"id": p.id, "question": p.question, "answer": str(p.answer)} for p in problems(split, count, seed)]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return Path(path)


def model_path() -> Path:
    """The folder of the world's base model, shipped inside the package: a Llama (0.86M parameters) and its
    character tokenizer, trained by `benches/train_world_model.py`. Load it like any model:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained(model_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(model_path())
    ```
    """
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {MODEL_DIR}; reinstall steer-lm")
    return MODEL_DIR
