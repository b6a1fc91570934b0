"""GRPO on a real model (SmolLM2-135M-Instruct by default) for a task family: the RL row of the real-model table.

    pip install -e ".[rl]"
    python benches/grpo_real.py --family arithmetic        # hours on 2 CPU cores; resumable: rerun to continue
    python benches/grpo_real.py --family word_problems

A family's file (`benches/data/<family>.jsonl`, laid out as `benches/real_model_loop.py` reads it) gives the held-out
test (its last `--test` problems, never seen here) and the validation problems that stop training (the ones after
the first `--train`, the head's rollout problems). GRPO trains on `--train-problems` problems drawn by the family's
generator with another seed, none of them a question of the file. The run lives in `benches/runs/grpo-<family>`
and resumes from its last checkpoint after a kill (`benches/grpo.py`); its best model is `.../best`, and the
curve, settings and compute go to `benches/results/grpo-<model>-<family>.json`.

Choices, for a run that fits a few hours on 2 CPU cores (float32; TRL 1.16 measured 180 s a step at 8 prompts x 8
completions x 64 tokens): full fine-tuning (a 135M model trains in float32 without trouble, and LoRA would not cut
the cost, which is generation); 4 prompts x 8 completions a step (groups of 8, as the paper's RL baselines and
`grpo_world.py`, and half the prompts to halve a step's time: 68 s a step measured); completions of up to 96
tokens for arithmetic, the evaluations' budget (shorter would cut answers the evaluation reads; for word problems,
where SmolLM2's greedy completions have a median of 158 tokens and 12% fit in 96, pass `--max-new-tokens 256
--micro-batch 8`, the micro-batch because a 256-token step in one pass ran out of 24 GB, and the same budget to
`paper_table_real.py`); temperature 0.7 (at TRL's 1.0 a
pilot on arithmetic rewarded 3% and 0% of its completions, and 75-100% of its groups had no reward variance, so no
gradient); learning rate 5e-6 (constant; 1e-6 is TRL's default for full fine-tuning over thousands of steps, and
this run has at most 150); validation at temperature 0.6 on 100 problems x 2 samples every 10 steps, stopping after 3
validations without improvement.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from families import FAMILIES
from grpo import GRPOSettings, train_grpo

from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import DEFAULT_INSTRUCTION

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--train", type=int, default=100, help="The file's first problems (the head's rollouts).")
    parser.add_argument("--validation-problems", type=int, default=100)
    parser.add_argument("--test", type=int, default=200, help="The file's last problems: never used here.")
    parser.add_argument("--train-problems", type=int, default=1000)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--validation-samples", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, help="Completions per forward/backward pass (default: a whole "
                        "step; 8 keeps a 256-token step within 24 GB).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, help="Run folder (default: benches/runs/grpo-<family>).")
    args = parser.parse_args()

    held = load_problems(ROOT / "data" / f"{args.family}.jsonl")
    validation = held[args.train : args.train + args.validation_problems]
    if len(validation) + args.train > len(held) - args.test:
        raise SystemExit(f"{args.family}.jsonl has {len(held)} problems: too few for {args.train} rollout, "
                         f"{args.validation_problems} validation and {args.test} test problems")
    train = importlib.import_module(args.family).training_problems(args.train_problems, held)
    model, tokenizer = load_model(args.model, device="cpu")
    settings = GRPOSettings(
        instruction=DEFAULT_INSTRUCTION, max_new_tokens=args.max_new_tokens, prompts_per_step=args.prompts_per_step,
        generations=args.generations, temperature=args.temperature, lr=args.lr, max_steps=args.max_steps,
        eval_every=args.eval_every, patience=args.patience, validation_samples=args.validation_samples,
        micro_batch=args.micro_batch,
        batch_size=args.validation_problems, seed=args.seed,
    )
    run = args.run or ROOT / "runs" / f"grpo-{args.family}"
    result = train_grpo(model, tokenizer, train, validation, settings, run)
    record = {"command": " ".join(["python benches/grpo_real.py", *sys.argv[1:]]),
              "arguments": {k: str(v) for k, v in vars(args).items()}, **result}
    out = ROOT / "results" / f"grpo-{Path(args.model).name}-{args.family}.json"
    atomic_write_json(out, record)
    best = result["best"]
    print(f"best validation accuracy {best['accuracy']:.3f} at step {best['step']} "
          f"(base {result['curve'][0]['accuracy']:.3f}); {best['train_seconds']:.0f} s of training to it -> {out}")


if __name__ == "__main__":
    main()
