"""Rollout throughput on the CPU: today's path (float32, batch 16) against larger batches, bfloat16 and a static cache.

    python benches/rollout_speed.py --model benches/models/SmolLM2-135M-Instruct --problems 64

Each variant samples the same prompts (temperature 0.6, top-p 0.95, the rollout defaults) through
`steer.pipeline.decoding.decode_batch`, the engine of `steer rollout` and `steer eval`; variants run in turn, twice,
and the faster of the two passes counts. Greedy agreement of each dtype with float32 is measured on the same prompts
(share of completions identical token for token). Writes `benches/results/rollout-speed-<model>.json`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings, decode_batch
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import DEFAULT_INSTRUCTION, build_prompt, encode_prompt

ROOT = Path(__file__).resolve().parent
VARIANTS = [("float32", 16), ("float32", 64), ("bfloat16", 16), ("bfloat16", 64)]


def prompts_for(tokenizer, data: Path, count: int) -> list[list[int]]:
    problems = load_problems(data, limit=count)
    return [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, DEFAULT_INSTRUCTION)) for p in problems]


def throughput(model, tokenizer, prompts, batch_size: int, settings: DecodingSettings) -> tuple[float, list]:
    """Generated tokens per second over all prompts, and the completions."""
    start, completions = time.perf_counter(), []
    for offset in range(0, len(prompts), batch_size):
        completions += decode_batch(model, tokenizer, prompts[offset : offset + batch_size], settings, seed=offset)
    return sum(c.steps for c in completions) / (time.perf_counter() - start), completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "arithmetic.jsonl")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {dtype: load_model(args.model, device="cpu", dtype=getattr(torch, dtype)) for dtype in ("float32",
                                                                                                        "bfloat16")}
    tokenizer = models["float32"][1]
    prompts = prompts_for(tokenizer, args.data, args.problems)
    sampled = DecodingSettings(max_new_tokens=args.max_new_tokens)
    rates: dict[str, list[float]] = {}
    for _ in range(2):
        for dtype, batch in VARIANTS:
            rate, _ = throughput(models[dtype][0], tokenizer, prompts, batch, sampled)
            rates.setdefault(f"{dtype}/batch{batch}", []).append(rate)
    best = {name: max(values) for name, values in rates.items()}
    greedy = DecodingSettings(temperature=0, max_new_tokens=args.max_new_tokens)
    outputs = {dtype: throughput(models[dtype][0], tokenizer, prompts, 16, greedy)[1] for dtype in models}
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["float32"], outputs["bfloat16"])) / len(prompts)
    baseline = best["float32/batch16"]
    record = {
        "command": f"python benches/rollout_speed.py --model {args.model} --problems {args.problems} "
                   f"--max-new-tokens {args.max_new_tokens} --threads {args.threads}",
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "tokens_per_second": best,
        "speedup_over_float32_batch16": {name: rate / baseline for name, rate in best.items()},
        "greedy_bfloat16_identical_to_float32": same,
        "passes": rates,
    }
    out = ROOT / "results" / f"rollout-speed-{Path(args.model).name}.json"
    atomic_write_json(out, record)
    for name, rate in best.items():
        print(f"{name:>18}: {rate:7.1f} tokens/s ({rate / baseline:.2f}x)")
    print(f"greedy bfloat16 identical to float32 on {same:.0%} of prompts -> {out}")


if __name__ == "__main__":
    main()
