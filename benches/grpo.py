"""GRPO with TRL's `GRPOTrainer`, stopped by validation accuracy and resumable: the RL baseline of the paper tables.

    pip install -e ".[rl]"
    python benches/grpo.py --family world                    # the built-in world: minutes on 2 CPU cores
    python benches/grpo.py --family arithmetic               # SmolLM2-135M-Instruct: hours, resumable (rerun)
    python benches/grpo.py --family word_problems --max-new-tokens 256 --micro-batch 8

[`train_grpo`] trains a model on problems (reward 1 when the boxed answer grades as right), measures the accuracy on
validation problems every `eval_every` steps (temperature 0.6, as the evaluations decode), stops after `patience`
checks without improvement, and keeps the best weights.

Everything lives in one run folder (`benches/runs/grpo-<family>`), so a run killed at any point resumes where its
last checkpoint left it:

- `checkpoint-<step>/`: TRL's checkpoint (weights, optimizer, scheduler, random state), written after each
  validation, with `grpo_progress.json` (the validation curve so far and the best step);
- `best/`: the best model so far and its tokenizer, replaced atomically when a validation improves on it;
- `result.json`: written when training ends (stopped, or out of steps).

Compute: training wall time (validation excluded; summed over the sittings of a resumed run) and an estimate of
FLOPs, 8N per prompt or completion token TRL counts (2N generation, 6N training forward and backward; with
`beta = 0` there is no reference model). Process CPU seconds are recorded beside wall time, and so is the median of
TRL's per-step times times the steps, a figure that other work on the machine during a few steps (or a paused
process) does not inflate.

The families ([`FAMILY_DEFAULTS`]):

- `world`: the world's base model on training-split problems of the built-in world, validated on other
  training-split problems; the best model is copied to `benches/models/world-grpo`, the result is
  `benches/results/grpo-world.json`.
- `arithmetic`, `word_problems` (`benches/families.py`): a family's file gives the validation problems that stop
  training (the ones after the first `--train`, the heads' rollout problems; its last `--test` are never used here),
  and GRPO trains on `--train-problems` problems drawn by the family's generator with another seed, none of them a
  question of the file. The result is `benches/results/grpo-<model>-<family>.json`. Choices, for a run that fits a
  few hours on 2 CPU cores (float32; TRL 1.16 measured 180 s a step at 8 prompts x 8 completions x 64 tokens): full
  fine-tuning (a 135M model trains in float32 without trouble, and LoRA would not cut the cost, which is
  generation); 4 prompts x 8 completions a step (groups of 8, as the paper's RL baselines, and half the world's
  prompts to halve a step's time: 68 s a step measured); completions of up to 96 tokens for arithmetic, the
  evaluations' budget (for word problems, where SmolLM2's greedy completions have a median of 158 tokens and 12%
  fit in 96, `--max-new-tokens 256 --micro-batch 8`, the micro-batch because a 256-token step in one pass ran out
  of 24 GB, and the same budget to `paper_table_real.py`); temperature 0.7 (at TRL's 1.0 a pilot on arithmetic
  rewarded 3% and 0% of its completions, and 75-100% of its groups had no reward variance, so no gradient);
  learning rate 5e-6 (constant; 1e-6 is TRL's default for full fine-tuning over thousands of steps, and this run
  has at most 150); validation at temperature 0.6 on 100 problems x 2 samples every 10 steps, stopping after 3
  validations without improvement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from families import FAMILIES
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerState
from trl import GRPOConfig, GRPOTrainer

from steer import world
from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings, decode_batch, derive_seed
from steer.pipeline.grading import grade
from steer.pipeline.problems import Problem, load_problems
from steer.pipeline.prompts import DEFAULT_INSTRUCTION, build_prompt, encode_prompt

FLOPS_PER_TOKEN_AND_PARAMETER = 8  # generation (2) + training forward and backward (6)
PROGRESS_FILE = "grpo_progress.json"
RESULT_FILE = "result.json"
BEST_DIR = "best"


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO run's choices (recorded in its result).

    Attributes:
        instruction (`str`): appended to each question, as the evaluations build prompts.
        max_new_tokens (`int`): completion budget in training and validation.
        prompts_per_step (`int`), generations (`int`): problems per optimizer step and completions per problem (the
            GRPO group); a step trains on their product.
        temperature (`float`): GRPO's sampling temperature.
        lr (`float`): AdamW learning rate (constant).
        max_steps (`int`), eval_every (`int`), patience (`int`): the step budget, the steps between validations
            (and checkpoints), and how many validations without improvement stop training.
        micro_batch (`int`, *optional*): completions per forward and backward pass, the step's gradient accumulated
            over them (memory: a pass holds logits of micro_batch x max_new_tokens x vocabulary); `None` is the
            whole step in one pass.
        validation_samples (`int`): decodes per validation problem at temperature 0.6.
        batch_size (`int`): sequences decoded together in validation.
        seed (`int`): TRL's seed and the validation's.
    """

    instruction: str
    max_new_tokens: int
    prompts_per_step: int = 8
    generations: int = 8
    temperature: float = 1.0
    lr: float = 3e-4
    max_steps: int = 1000
    eval_every: int = 25
    patience: int = 4
    micro_batch: int | None = None
    validation_samples: int = 2
    batch_size: int = 128
    seed: int = 0


def prompt_dataset(problems: list[Problem], instruction: str) -> Dataset:
    """Conversational prompts (TRL applies the chat template, as `build_prompt` does) with the gold answers."""
    content = [f"{p.question}\n{instruction}" if instruction else p.question for p in problems]
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": text}], "answer": p.gold} for text, p in zip(content, problems)
    ])


def correctness(completions: list[list[dict]], answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's answer grades as the gold answer, else 0.0."""
    return [float(grade(completion[0]["content"], gold)) for completion, gold in zip(completions, answer)]


def sampled_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
                     settings: GRPOSettings) -> float:
    """Mean correctness of `settings.validation_samples` completions per problem at temperature 0.6."""
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, settings.instruction)) for p in problems]
    decoding = DecodingSettings(max_new_tokens=settings.max_new_tokens)
    was_training = model.training
    model.eval()
    correct = 0
    for sample in range(settings.validation_samples):
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start : start + settings.batch_size]
            completions = decode_batch(model, tokenizer, batch, decoding, derive_seed(settings.seed, sample, start))
            correct += sum(grade(c.text, p.gold) for c, p in zip(completions, problems[start : start + len(batch)]))
    model.train(was_training)
    return correct / (settings.validation_samples * len(prompts))


class ValidationStop(TrainerCallback):
    """Every `eval_every` steps, the validation accuracy; keeps the best weights and stops training after `patience`
    checks without improvement. Its state travels with each checkpoint ([`PROGRESS_FILE`]), the best weights go to
    `<run>/best`, and time spent validating is kept apart from training time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], settings: GRPOSettings,
                 run: Path) -> None:
        self.tokenizer, self.problems, self.settings, self.run = tokenizer, problems, settings, run
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.waits = 0
        self.seconds = 0.0  # training seconds of earlier sittings
        self.cpu_seconds = 0.0
        self.validation_seconds = 0.0
        self.begin()

    def begin(self) -> None:
        """Start this sitting's training clock."""
        self._sitting_start, self._sitting_cpu = time.perf_counter(), time.process_time()
        self._sitting_validation, self._sitting_validation_cpu = 0.0, 0.0

    def train_seconds(self) -> tuple[float, float]:
        """Training wall and CPU seconds so far, over every sitting, validation excluded."""
        wall = time.perf_counter() - self._sitting_start - self._sitting_validation
        cpu = time.process_time() - self._sitting_cpu - self._sitting_validation_cpu
        return self.seconds + wall, self.cpu_seconds + cpu

    def check(self, model: PreTrainedModel, step: int, tokens_seen: int) -> bool:
        """Record the validation accuracy at `step`; whether training should stop."""
        began, began_cpu = time.perf_counter(), time.process_time()
        accuracy = sampled_accuracy(model, self.tokenizer, self.problems, self.settings)
        spent = time.perf_counter() - began
        self._sitting_validation += spent
        self._sitting_validation_cpu += time.process_time() - began_cpu
        self.validation_seconds += spent
        wall, cpu = self.train_seconds()
        point = {"step": step, "accuracy": accuracy, "tokens_seen": tokens_seen, "train_seconds": wall,
                 "train_cpu_seconds": cpu}
        self.curve.append(point)
        print(json.dumps(point), flush=True)
        if self.best is None or accuracy > self.best["accuracy"]:
            self.best, self.waits = point, 0
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            self.waits += 1
        return self.waits >= self.settings.patience

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.settings.eval_every == 0 and self.check(
            model, state.global_step, state.num_input_tokens_seen
        ):
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        """Write the best weights (when they changed) and this callback's state beside the new checkpoint."""
        if self.best_state is not None:
            self.save_best(model)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        wall, cpu = self.train_seconds()
        atomic_write_json(checkpoint / PROGRESS_FILE, {
            "curve": self.curve, "best": self.best, "waits": self.waits, "seconds": wall, "cpu_seconds": cpu,
            "validation_seconds": self.validation_seconds,
        })
        return control

    def save_best(self, model: PreTrainedModel) -> None:
        """Replace `<run>/best` with the best weights, atomically (written beside, then renamed)."""
        staging, final = self.run / f".{BEST_DIR}.tmp", self.run / BEST_DIR
        shutil.rmtree(staging, ignore_errors=True)
        current = {name: t.detach().clone() for name, t in model.state_dict().items()}
        model.load_state_dict(self.best_state)
        model.save_pretrained(staging)
        model.load_state_dict(current)
        self.tokenizer.save_pretrained(staging)
        (staging / "grpo_best.json").write_text(json.dumps(self.best))
        old = self.run / f".{BEST_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        self.best_state = None  # on disk now; a later improvement makes a new one

    def restore(self, checkpoint: Path) -> None:
        """Take the state written with `checkpoint` (a resumed run)."""
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
        self.curve, self.best, self.waits = progress["curve"], progress["best"], progress["waits"]
        self.seconds, self.cpu_seconds = progress["seconds"], progress["cpu_seconds"]
        self.validation_seconds = progress["validation_seconds"]


def latest_checkpoint(run: Path) -> Path | None:
    """The run's newest checkpoint that has its progress file (an interrupted save is skipped)."""
    done = [path for path in run.glob("checkpoint-*") if (path / PROGRESS_FILE).exists()]
    return max(done, key=lambda path: int(path.name.split("-")[1]), default=None)


def train_grpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: list[Problem],
               validation: list[Problem], settings: GRPOSettings, run: Path) -> dict:
    """Train `model` with GRPO on `train` until validation stops improving; resume from `run` if it holds a
    checkpoint. Returns the result (also written to `<run>/result.json`); the best model is in `<run>/best`."""
    run.mkdir(parents=True, exist_ok=True)
    if (run / RESULT_FILE).exists():
        return json.loads((run / RESULT_FILE).read_text())
    parameters = sum(p.numel() for p in model.parameters())
    stop = ValidationStop(tokenizer, validation, settings, run)
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        if (run / BEST_DIR).exists():
            raise SystemExit(f"{run} holds a best model but no checkpoint with its progress: refusing to start over "
                             "and overwrite it (remove the folder to start a new run)")
        stop.check(model, 0, 0)
        stop.save_best(model)
    else:
        stop.restore(checkpoint)
        print(f"resuming from {checkpoint}", flush=True)
    step = settings.prompts_per_step * settings.generations
    micro = settings.micro_batch or step
    if step % micro:
        raise SystemExit(f"micro_batch {micro} must divide the {step} completions of a step")
    config = GRPOConfig(
        output_dir=str(run), learning_rate=settings.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=micro, gradient_accumulation_steps=step // micro, generation_batch_size=step,
        num_generations=settings.generations, max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature, beta=0.0, max_steps=settings.max_steps, logging_steps=1,
        save_strategy="steps", save_steps=settings.eval_every, save_total_limit=2, report_to="none", use_cpu=True,
        bf16=False, seed=settings.seed, disable_dropout=True, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config,
                          train_dataset=prompt_dataset(train, settings.instruction), processing_class=tokenizer,
                          callbacks=[stop])
    stop.begin()
    if stop.waits < settings.patience:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    else:  # stopped before the last sitting ended: its log is the checkpoint's
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if stop.best_state is not None:
        stop.save_best(model)
    best, last = stop.best, stop.curve[-1]
    step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    median_step = float(np.median(step_times)) if step_times else None
    for point in (best, last):
        point["median_step_seconds_x_steps"] = median_step * point["step"] if median_step else None
    result = {
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "trl": __import__("trl").__version__, "parameters": parameters, "settings": asdict(settings),
        "train_problems": len(train), "validation_problems": len(validation),
        "best": {**best, "flops": FLOPS_PER_TOKEN_AND_PARAMETER * parameters * best["tokens_seen"]},
        "total": {**last, "flops": FLOPS_PER_TOKEN_AND_PARAMETER * parameters * last["tokens_seen"]},
        "validation_seconds": stop.validation_seconds, "curve": stop.curve, "model": str(run / BEST_DIR),
        "flops_estimate": "8 N per prompt or completion token seen (2 N generation, 6 N training); beta = 0",
        "log": trainer.state.log_history,
    }
    atomic_write_json(run / RESULT_FILE, result)
    return result


ROOT = Path(__file__).resolve().parent
# Each family's defaults; an option given on the command line wins.
FAMILY_DEFAULTS = {
    "world": dict(model=None, train=0, validation_problems=200, test=0, train_problems=2000, prompts_per_step=8,
                  generations=8, max_new_tokens=80, lr=3e-4, temperature=1.0, max_steps=1000, eval_every=25,
                  patience=4, validation_samples=2, batch_size=128),
    **{family: dict(model=str(ROOT / "models" / "SmolLM2-135M-Instruct"), train=100, validation_problems=100,
                    test=200, train_problems=1000, prompts_per_step=4, generations=8, max_new_tokens=96, lr=5e-6,
                    temperature=0.7, max_steps=150, eval_every=10, patience=3, validation_samples=2, batch_size=None)
       for family in FAMILIES},
}


def family_problems(family: str, options: dict, seed: int) -> tuple[list[Problem], list[Problem]]:
    """GRPO's training and validation problems for `family` (see the module docstring)."""
    if family == "world":
        drawn = [Problem(p.id, p.question, str(p.answer), "world")
                 for p in world.problems("train", options["train_problems"] + options["validation_problems"], seed)]
        return drawn[: options["train_problems"]], drawn[options["train_problems"]:]
    held = load_problems(ROOT / "data" / f"{family}.jsonl")
    first, count = options["train"], options["validation_problems"]
    validation = held[first: first + count]
    if len(validation) + first > len(held) - options["test"]:
        raise SystemExit(f"{family}.jsonl has {len(held)} problems: too few for {first} rollout, {count} validation "
                         f"and {options['test']} test problems")
    return FAMILIES[family].training(options["train_problems"], held), validation


def family_settings(family: str, options: dict, micro_batch: int | None, seed: int) -> GRPOSettings:
    """The run's settings: the family's instruction and the resolved options."""
    names = ("max_new_tokens", "prompts_per_step", "generations", "temperature", "lr", "max_steps", "eval_every",
             "patience", "validation_samples")
    batch_size = options["batch_size"] or options["validation_problems"]
    return GRPOSettings(instruction=world.INSTRUCTION if family == "world" else DEFAULT_INSTRUCTION,
                        **{name: options[name] for name in names}, micro_batch=micro_batch, batch_size=batch_size,
                        seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_DEFAULTS), required=True)
    parser.add_argument("--model", help="default: the world's model, or SmolLM2-135M-Instruct for the other families")
    for name, kind in (("train", int), ("validation_problems", int), ("test", int), ("train_problems", int),
                       ("prompts_per_step", int), ("generations", int), ("max_new_tokens", int), ("lr", float),
                       ("temperature", float), ("max_steps", int), ("eval_every", int), ("patience", int),
                       ("validation_samples", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="default: the family's (FAMILY_DEFAULTS)")
    parser.add_argument("--micro-batch", type=int, help="Completions per forward/backward pass (default: a whole "
                        "step; 8 keeps a 256-token step within 24 GB).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, help="Run folder (default: benches/runs/grpo-<family>).")
    args = parser.parse_args()
    given = {name: value for name, value in vars(args).items() if value is not None}
    options = {**FAMILY_DEFAULTS[args.family], **given}
    train, validation = family_problems(args.family, options, args.seed)
    model, tokenizer = load_model(options["model"] or world.model_path(), device="cpu")
    settings = family_settings(args.family, options, args.micro_batch, args.seed)
    run = args.run or ROOT / "runs" / f"grpo-{args.family}"
    result = train_grpo(model, tokenizer, train, validation, settings, run)
    record = {"command": " ".join(["python benches/grpo.py", *sys.argv[1:]]),
              "arguments": {name: str(value) for name, value in given.items()}, **result}
    if args.family == "world":
        model_out = ROOT / "models" / "world-grpo"
        shutil.copytree(run / BEST_DIR, model_out, dirs_exist_ok=True)
        record.update(model=f"{model_out} (not committed; rerun the command)")
        record.pop("log")
        out = ROOT / "results" / "grpo-world.json"
    else:
        out = ROOT / "results" / f"grpo-{Path(options['model']).name}-{args.family}.json"
    atomic_write_json(out, record)
    best = result["best"]
    print(f"best validation accuracy {best['accuracy']:.3f} at step {best['step']} "
          f"(base {result['curve'][0]['accuracy']:.3f}); {best['train_seconds']:.0f} s of training to it -> {out}")


if __name__ == "__main__":
    main()
