"""GRPO baseline on the built-in world, with TRL's `GRPOTrainer` (`pip install -e ".[rl]"`).

    python benches/grpo_world.py                 # minutes on 2 CPU cores (see the result file)

Trains the world's base model with GRPO on training-split problems (reward 1 when the boxed answer is right) until
the accuracy on validation problems (also from the training split, disjoint from GRPO's prompts; temperature 0.6,
as the demo evaluates) stops improving (`benches/grpo.py`), keeping the best checkpoint. The run resumes from
`benches/runs/grpo-world`; the best model is copied to `benches/models/world-grpo`, and the curve and compute go to
`benches/results/grpo-world.json`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from grpo import BEST_DIR, GRPOSettings, train_grpo

from steer import world
from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.problems import Problem

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_OUT = ROOT / "models" / "world-grpo"
DEFAULT_RESULT = ROOT / "results" / "grpo-world.json"
MAX_NEW_TOKENS = 80  # as in the demo


def as_problems(drawn: list[world.WorldProblem]) -> list[Problem]:
    return [Problem(p.id, p.question, str(p.answer), "world") for p in drawn]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-problems", type=int, default=2000)
    parser.add_argument("--validation-problems", type=int, default=200)
    parser.add_argument("--validation-samples", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8, help="Completions per prompt (the GRPO group).")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "grpo-world")
    parser.add_argument("--model-out", type=Path, default=DEFAULT_MODEL_OUT)
    parser.add_argument("--result", type=Path, default=DEFAULT_RESULT)
    args = parser.parse_args()

    drawn = as_problems(world.problems("train", args.train_problems + args.validation_problems, seed=args.seed))
    train, validation = drawn[: args.train_problems], drawn[args.train_problems :]
    model, tokenizer = load_model(world.model_path(), device="cpu")
    settings = GRPOSettings(
        instruction=world.INSTRUCTION, max_new_tokens=MAX_NEW_TOKENS, prompts_per_step=args.prompts_per_step,
        generations=args.generations, lr=args.lr, max_steps=args.max_steps, eval_every=args.eval_every,
        patience=args.patience, validation_samples=args.validation_samples, seed=args.seed,
    )
    result = train_grpo(model, tokenizer, train, validation, settings, args.run)
    shutil.copytree(args.run / BEST_DIR, args.model_out, dirs_exist_ok=True)
    result = {"command": "python benches/grpo_world.py", **result, "model": f"{args.model_out} (not committed; "
              "rerun the command)"}
    result.pop("log")
    atomic_write_json(args.result, result)
    best = result["best"]
    print(f"best validation accuracy {best['accuracy']:.3f} at step {best['step']} "
          f"(base {result['curve'][0]['accuracy']:.3f}); {best['train_seconds']:.0f} s of training to it "
          f"-> {args.result}")


if __name__ == "__main__":
    main()
