"""Multi-step word problems for running the method on a small real model: a second task family beside arithmetic.

    python benches/word_problems.py                  # writes benches/data/word_problems.jsonl (400 problems)

Each problem is a short story with two or three operations on small whole numbers written in sentences ("Mia has 14
marbles. She buys 6 more, then gives 5 to her brother. How many marbles does Mia have now?"), seeded, in the
`{"id", "question", "answer"}` JSONL format `steer` reads. Every intermediate value and the answer are positive
whole numbers.

The file is laid out as `benches/data/arithmetic.jsonl` is for `benches/real_model_loop.py` and
`benches/paper_table_real.py`: the first problems feed rollouts, the last 200 are the held-out test. Training
problems for GRPO come from [`training_problems`], a different seed, with every question of the file removed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from families import write_family

from steer.pipeline.problems import Problem

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Lily", "Ben", "Emma", "Noah")
THINGS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells", "cards", "stamps")
PRONOUN = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Lily": "She", "Emma": "She"}


def _pronoun(name: str) -> str:
    return PRONOUN.get(name, "He")


def _buy_then_give(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    a, b = rng.randint(5, 30), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}. {_pronoun(name)} buys {b} more, then gives {c} to a friend. "
            f"How many {thing} does {name} have now?"), a + b - c


def _boxes(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    boxes, each, extra = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 12)
    return (f"{name} has {boxes} boxes with {each} {thing} in each box, and {extra} {thing} outside the boxes. "
            f"How many {thing} does {name} have in all?"), boxes * each + extra


def _share(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    friends, each, kept = rng.randint(2, 6), rng.randint(2, 8), rng.randint(1, 9)
    total = friends * each + kept
    return (f"{name} has {total} {thing}. {_pronoun(name)} keeps {kept} and shares the rest equally among "
            f"{friends} friends. How many {thing} does each friend get?"), each


def _two_days(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    first, more, used = rng.randint(3, 20), rng.randint(2, 10), rng.randint(1, 10)
    second = first + more
    used = min(used, first + second - 1)
    question = (f"{name} collected {first} {thing} on Monday and {more} more on Tuesday than on Monday. "
                f"{_pronoun(name)} then lost {used} of them. How many {thing} does {name} have left?")
    return question, first + second - used


def _packs_minus(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    packs, each = rng.randint(2, 8), rng.randint(3, 10)
    given = rng.randint(1, packs * each - 1)
    return (f"{name} buys {packs} packs of {thing}. Each pack has {each} {thing}. {_pronoun(name)} gives away "
            f"{given} {thing}. How many {thing} are left?"), packs * each - given


def _three_steps(rng: random.Random, name: str, thing: str) -> tuple[str, int]:
    a, b, c = rng.randint(15, 40), rng.randint(2, 12), rng.randint(2, 9)
    d = rng.randint(1, a - b + c - 1)
    return (f"{name} has {a} {thing}. {_pronoun(name)} gives {b} to a sister, finds {c} more, and then sells {d}. "
            f"How many {thing} does {name} have now?"), a - b + c - d


TEMPLATES: tuple[Callable[[random.Random, str, str], tuple[str, int]], ...] = (
    _buy_then_give, _boxes, _share, _two_days, _packs_minus, _three_steps,
)


def word_problems(count: int, seed: int = 0, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """`count` seeded problems cycling through the templates, no question repeated and none in `exclude`."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen = set(exclude)
    i = 0
    while len(problems) < count:
        template = TEMPLATES[i % len(TEMPLATES)]
        i += 1
        question, answer = template(rng, rng.choice(NAMES), rng.choice(THINGS))
        if question in seen or answer <= 0:
            continue
        seen.add(question)
        problems.append(Problem(f"word-{len(problems)}", question, str(answer), "word_problems"))
    return problems


def training_problems(count: int, held: list[Problem], seed: int = 1) -> list[Problem]:
    """Problems for training (GRPO) drawn with another seed, none of them a question in `held`."""
    return word_problems(count, seed, exclude=frozenset(p.question for p in held))


if __name__ == "__main__":
    write_family(word_problems, "word_problems", __doc__.splitlines()[0])
