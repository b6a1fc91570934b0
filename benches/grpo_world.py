"""GRPO baseline on the built-in world, with TRL's `GRPOTrainer` (`pip install -e ".[rl]"`).

    python benches/grpo_world.py                 # minutes on 2 CPU cores (see the result file)

Trains the world's base model with GRPO on training-split problems (reward 1 when the boxed answer is right), checks
the accuracy on validation problems (also from the training split, disjoint from GRPO's prompts; temperature 0.6,
as the demo evaluates) every `--eval-every` steps, stops after `--patience` checks without improvement, and keeps the
best checkpoint. Writes the model to `benches/models/world-grpo` and the curve and compute to
`benches/results/grpo-world.json`.

Compute is the wall time of training (validation excluded) and an estimate of its FLOPs: 2N per token generated
or prefilled plus 6N per token trained (forward and backward), N the parameter count, i.e. 8N per token TRL counts
in `num_input_tokens_seen` (prompt and completion tokens); with `beta = 0` there is no reference model.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from steer import world
from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings, decode_batch, derive_seed
from steer.pipeline.grading import grade
from steer.pipeline.prompts import build_prompt, encode_prompt

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_OUT = ROOT / "models" / "world-grpo"
DEFAULT_RESULT = ROOT / "results" / "grpo-world.json"
MAX_NEW_TOKENS = 80  # as in the demo
FLOPS_PER_TOKEN_AND_PARAMETER = 8  # generation (2) + training forward and backward (6)


def prompt_dataset(problems: list[world.WorldProblem]) -> Dataset:
    """Conversational prompts (TRL applies the chat template, as `build_prompt` does) with the gold answers."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p.question}], "answer": str(p.answer)} for p in problems
    ])


def correctness(completions: list[list[dict]], answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's answer grades as the gold answer, else 0.0."""
    return [float(grade(completion[0]["content"], gold)) for completion, gold in zip(completions, answer)]


def sampled_accuracy(model, tokenizer, problems: list[world.WorldProblem], samples: int, seed: int) -> float:
    """Mean correctness of `samples` completions per problem at temperature 0.6."""
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, world.INSTRUCTION)) for p in problems]
    golds = [str(p.answer) for p in problems]
    settings = DecodingSettings(max_new_tokens=MAX_NEW_TOKENS)
    was_training = model.training
    model.eval()
    correct = 0
    for sample in range(samples):
        for start in range(0, len(prompts), 128):
            batch = prompts[start : start + 128]
            completions = decode_batch(model, tokenizer, batch, settings, derive_seed(seed, sample, start))
            correct += sum(grade(c.text, g) for c, g in zip(completions, golds[start : start + 128]))
    model.train(was_training)
    return correct / (samples * len(prompts))


class ValidationStop(TrainerCallback):
    """Every `every` steps, the validation accuracy; keeps the best weights and stops training after `patience`
    checks without improvement. Time spent validating is kept apart from training time."""

    def __init__(self, tokenizer, problems, every: int, patience: int, samples: int, seed: int) -> None:
        self.tokenizer, self.problems = tokenizer, problems
        self.every, self.patience, self.samples, self.seed = every, patience, samples, seed
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.waits = 0
        self.begin()

    def begin(self) -> None:
        """Start the training clock (validation time is counted apart from here on)."""
        self.validation_seconds = 0.0
        self.start = time.perf_counter()

    def check(self, model, step: int, tokens_seen: int) -> bool:
        """Record the validation accuracy at `step`; whether training should stop."""
        began = time.perf_counter()
        accuracy = sampled_accuracy(model, self.tokenizer, self.problems, self.samples, self.seed)
        self.validation_seconds += time.perf_counter() - began
        point = {"step": step, "accuracy": accuracy, "tokens_seen": tokens_seen,
                 "train_seconds": time.perf_counter() - self.start - self.validation_seconds}
        self.curve.append(point)
        print(json.dumps(point), flush=True)
        if self.best is None or accuracy > self.best["accuracy"]:
            self.best, self.waits = point, 0
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            self.waits += 1
        return self.waits >= self.patience

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and self.check(model, state.global_step, state.num_input_tokens_seen):
            control.should_training_stop = True
        return control


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
    parser.add_argument("--model-out", type=Path, default=DEFAULT_MODEL_OUT)
    parser.add_argument("--result", type=Path, default=DEFAULT_RESULT)
    args = parser.parse_args()

    drawn = world.problems("train", args.train_problems + args.validation_problems, seed=args.seed)
    train, validation = drawn[: args.train_problems], drawn[args.train_problems :]
    model, tokenizer = load_model(world.model_path(), device="cpu")
    parameters = sum(p.numel() for p in model.parameters())
    stop = ValidationStop(tokenizer, validation, args.eval_every, args.patience, args.validation_samples, args.seed)
    stop.check(model, 0, 0)
    with tempfile.TemporaryDirectory() as scratch:
        config = GRPOConfig(
            output_dir=scratch, learning_rate=args.lr, lr_scheduler_type="constant",
            per_device_train_batch_size=args.prompts_per_step * args.generations, num_generations=args.generations,
            max_completion_length=MAX_NEW_TOKENS, temperature=1.0, beta=0.0, max_steps=args.max_steps,
            logging_steps=args.eval_every, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            seed=args.seed, disable_dropout=True, gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=prompt_dataset(train),
                              processing_class=tokenizer, callbacks=[stop])
        stop.begin()
        trainer.train()
    model.load_state_dict(stop.best_state)
    model.save_pretrained(args.model_out)
    tokenizer.save_pretrained(args.model_out)
    best, last = stop.best, stop.curve[-1]
    result = {
        "command": "python benches/grpo_world.py", "arguments": {k: str(v) for k, v in vars(args).items()},
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "trl": __import__("trl").__version__, "parameters": parameters,
        "best": {**best, "flops": FLOPS_PER_TOKEN_AND_PARAMETER * parameters * best["tokens_seen"]},
        "total": {**last, "flops": FLOPS_PER_TOKEN_AND_PARAMETER * parameters * last["tokens_seen"]},
        "validation_seconds": stop.validation_seconds, "curve": stop.curve, "model": str(args.model_out),
        "flops_estimate": "8 N per prompt or completion token seen (2 N generation, 6 N training); beta = 0",
    }
    atomic_write_json(args.result, result)
    print(f"best validation accuracy {best['accuracy']:.3f} at step {best['step']} "
          f"(base {stop.curve[0]['accuracy']:.3f}); {best['train_seconds']:.0f} s of training to it -> {args.result}")


if __name__ == "__main__":
    main()
