"""The task families of the real-model benchmarks: seeded problem generators, and the one way their files are written.

    python benches/families.py arithmetic        # writes benches/data/arithmetic.jsonl (400 problems)
    python benches/families.py word_problems     # writes benches/data/word_problems.jsonl (400 problems)

- `arithmetic`: mixed one-step problems (a two-digit and a one-digit number added or subtracted, two one-digit
  numbers multiplied). A 135M model solves some of them and not others, which is what rollouts need to contrast.
- `word_problems`: short stories with two or three operations on small whole numbers written in sentences ("Mia has
  14 marbles. She buys 6 more, then gives 5 to her brother. How many marbles does Mia have now?"); every
  intermediate value and the answer are positive whole numbers.

A family is a [`Family`]: its generator of [`Problem`]s, and `training`, problems for training (GRPO) drawn with
another seed that avoid every question of the family's file. Files are `{"id", "question", "answer"}` JSONL, laid out
as `benches/real_model_loop.py` and `benches/paper_table_real.py` read them: the first problems for the heads'
rollouts, the next for validation, the last 200 held out.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steer.pipeline.problems import Problem

DATA = Path(__file__).resolve().parent / "data"


def arithmetic(count: int, seed: int = 0) -> list[Problem]:
    """`count` seeded problems, cycling through addition, subtraction and multiplication."""
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        if i % 3 == 0:
            question, answer = f"What is {a} + {b}?", a + b
        elif i % 3 == 1:
            question, answer = f"What is {a} - {b}?", a - b
        else:
            a = rng.randint(2, 9)
            question, answer = f"What is {a} * {b}?", a * b
        problems.append(Problem(f"arith-{i}", question, str(answer), "arithmetic"))
    return problems


def arithmetic_training(count: int, held: list[Problem], seed: int = 1) -> list[Problem]:
    """Problems for training (GRPO) drawn with another seed, none of them a question in `held`, none repeated."""
    seen = {p.question for p in held}
    problems: list[Problem] = []
    for draw in range(1, 11):
        for problem in arithmetic(count * draw, seed + 1000 * draw):
            if problem.question not in seen and len(problems) < count:
                seen.add(problem.question)
                problems.append(Problem(f"arith-train-{len(problems)}", problem.question, problem.gold, "arithmetic"))
        if len(problems) == count:
            return problems
    raise ValueError(f"only {len(problems)} distinct arithmetic problems outside the held ones; asked for {count}")



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


def word_problems_training(count: int, held: list[Problem], seed: int = 1) -> list[Problem]:
    """Problems for training (GRPO) drawn with another seed, none of them a question in `held`."""
    return word_problems(count, seed, exclude=frozenset(p.question for p in held))



@dataclass(frozen=True)
class Family:
    """A task family: `generate(count, seed)` draws its problems, `training(count, held)` problems for GRPO that
    avoid every question of `held`."""

    generate: Callable[[int, int], list[Problem]]
    training: Callable[[int, list[Problem]], list[Problem]]


FAMILIES = {
    "arithmetic": Family(arithmetic, arithmetic_training),
    "word_problems": Family(word_problems, word_problems_training),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: benches/data/<family>.jsonl")
    args = parser.parse_args()
    out = args.out or DATA / f"{args.family}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = FAMILIES[args.family].generate(args.count, args.seed)
    lines = [json.dumps({"id": p.id, "question": p.question, "answer": p.gold}) for p in problems]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} problems to {out}")


if __name__ == "__main__":
    main()
