"""A simple arithmetic benchmark for running the method on a small real model (SmolLM2-135M-Instruct).

    python benches/arithmetic.py                     # writes benches/data/arithmetic.jsonl (400 problems)

Mixed one-step problems (a two-digit and a one-digit number added or subtracted, two one-digit numbers
multiplied), seeded, in the
`{"id", "question", "answer"}` JSONL format `steer` reads. A 135M model solves some of them and not others, which
is what rollouts need to contrast.
"""

from __future__ import annotations

import random

from families import write_family

from steer.pipeline.problems import Problem


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


def training_problems(count: int, held: list[Problem], seed: int = 1) -> list[Problem]:
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


if __name__ == "__main__":
    write_family(arithmetic, "arithmetic", __doc__.splitlines()[0])
