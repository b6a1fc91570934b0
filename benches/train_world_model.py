"""Train the built-in world's base model: a small Llama that reads and writes characters
(see `steer/world/generator.py`).

    python benches/train_world_model.py      # writes steer/world/assets/world-model (about 27 minutes on 2 cores)
    python benches/train_world_model.py --steps 200 --out /tmp/m   # a quick smoke run

Seeded and reproducible on the same machine and library versions. It trains on freshly drawn training problems
(never a test problem) with the mixed-writer solutions of the corpus, on completion tokens only, then reports the
figures the built-in world is meant to have: held-out pass@1 at temperature 0.6, pass@16, greedy accuracy, and the
share of generated positions whose entropy exceeds a threshold. The report goes beside the model
(`training.json`) and to `benches/results/world-model.json`.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import steer
from steer import world
from steer.files import atomic_write_json
from steer.pipeline.decoding import DecodingSettings, decode_batch
from steer.pipeline.grading import grade
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.world.tokenizer import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "steer" / "world" / "assets" / "world-model"
RESULTS = ROOT / "benches" / "results" / "world-model.json"


def build(seed: int) -> tuple[LlamaForCausalLM, object]:
    tokenizer = char_tokenizer(world.ALPHABET, model_max_length=128)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def training_batch(tokenizer, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """Fresh training problems with corpus solutions; labels only on the solution and its end-of-sequence token."""
    rows, labels = [], []
    while len(rows) < size:
        problem = world.WorldProblem(tuple(rng.sample(range(10, 100), world.LIST_LENGTH)))
        if problem.split != "train":
            continue
        prompt = encode_prompt(tokenizer, build_prompt(tokenizer, problem.question, world.INSTRUCTION))
        answer = tokenizer(world.solution(problem, rng), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([label + [-100] * (width - len(label)) for label in labels]),
    }


@torch.no_grad()
def evaluate(model, tokenizer, count: int, samples: int, tau: float) -> dict[str, float]:
    """Held-out figures: pass@1 at temperature 0.6 (mean over `samples`), pass@`samples`, greedy accuracy, and the
    share of sampled positions with entropy above `tau`."""
    model.eval()
    problems = world.problems("test", count, seed=12345)
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, world.INSTRUCTION)) for p in problems]
    greedy = decode_batch(model, tokenizer, prompts, DecodingSettings(temperature=0, max_new_tokens=80), seed=0)
    correct = [[] for _ in problems]
    above, positions = 0, 0
    for sample in range(samples):
        sampled = decode_batch(model, tokenizer, prompts, DecodingSettings(0.6, 1.0, 80), seed=sample)
        for i, (problem, completion) in enumerate(zip(problems, sampled)):
            correct[i].append(grade(completion.text, str(problem.answer)))
        above_step, positions_step = _entropy_share(model, prompts, sampled, tau)
        above, positions = above + above_step, positions + positions_step
    model.train()
    return {
        "pass@1": sum(sum(c) / samples for c in correct) / count,
        f"pass@{samples}": sum(any(c) for c in correct) / count,
        "greedy": sum(grade(c.text, str(p.answer)) for p, c in zip(problems, greedy)) / count,
        "entropy_above_tau": above / positions,
        "tau": tau,
    }


def _entropy_share(model, prompts, completions, tau: float) -> tuple[int, int]:
    """Positions of the completions (teacher-forced) whose base entropy exceeds `tau`, and all positions."""
    above = total = 0
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion.token_ids])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        entropy = steer.entropy_topk(logits, 1).entropy
        above += int((entropy > tau).sum())
        total += entropy.numel()
    return above, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--tau", type=float, default=0.4, help="entropy threshold reported (nats)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    model, tokenizer = build(args.seed)
    rng = random.Random(args.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    )
    history, start = [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**training_batch(tokenizer, rng, args.batch_size)).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            figures = evaluate(model, tokenizer, args.eval_problems, samples=16, tau=args.tau)
            history.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start, **figures})
            print(history[-1], flush=True)

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {"arguments": {k: str(v) for k, v in vars(args).items()}, "parameters": model.num_parameters(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "history": history}
    atomic_write_json(args.out / "training.json", record)
    atomic_write_json(RESULTS, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
