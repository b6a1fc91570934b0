"""The task families of the real-model benchmarks, and the one way their problem files are written.

A family is a module in `benches/` with a seeded generator of [`Problem`]s and `training_problems(count, held)`,
problems for training (GRPO) that avoid every question of the family's file. Its file, `benches/data/<family>.jsonl`,
is laid out as `benches/real_model_loop.py` and `benches/paper_table_real.py` read it: the first problems for the
heads' rollouts, the next for validation, the last 200 held out.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from steer.pipeline.problems import Problem

FAMILIES = ("arithmetic", "word_problems")
DATA = Path(__file__).resolve().parent / "data"


def write_family(generate: Callable[[int, int], list[Problem]], name: str, description: str) -> None:
    """The command line of a family module: write `--count` problems drawn with `--seed` to its file."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA / f"{name}.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    problems = generate(args.count, args.seed)
    lines = [json.dumps({"id": p.id, "question": p.question, "answer": p.gold}) for p in problems]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} problems to {args.out}")
