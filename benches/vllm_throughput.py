"""Tokens per second of vLLM with and without a steering head, and of `steer rollout --engine vllm` against `hf`.

    python -m steer.integrations.vllm.install_cpu        # on a CPU, once
    python benches/vllm_throughput.py --model benches/models/SmolLM2-135M-Instruct

1. Steering's cost inside vLLM: a plain engine and a steered one (a head at tau = 0, so every row is gated and
   corrected: the most work steering can do) decode the same prompts, greedy and sampled, `--new-tokens` each
   (end-of-sequence ignored), in turns A B A B over `--rounds` rounds; the median tokens/s of each and the
   overhead. Goals: at most 3% on a CPU, 2% on a GPU.
2. Rollouts: `steer rollout` through each engine on the same problems and settings (`--rollout-problems` problems x
   4 samples at temperature 0.6), tokens/s of the decoding job (engine start-up excluded, and reported). Goal: vLLM
   at least 2x the hf engine.

Writes `benches/results/vllm-throughput-<model>-<device>.json`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.models import load_model
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.rollout import run_rollouts
from steer.settings import DecodingSettings, RolloutSettings

ROOT = Path(__file__).resolve().parent


def timed_generate(llm, prompts, params) -> float:
    """Tokens per second of one `generate` call."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def steering_cost(model: str, head_dir: str, prompts: list[list[int]], new_tokens: int, rounds: int,
                  dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from steer.integrations.vllm import engine_defaults, steered_llm, steering_stats

    engine = {"dtype": dtype, "enforce_eager": True, "seed": 0, "max_model_len": 1024}
    started = time.perf_counter()
    plain = LLM(model=model, **engine_defaults(model, engine))
    startup_plain = time.perf_counter() - started
    started = time.perf_counter()
    steered = steered_llm(model, head_dir, **engine)
    startup_steered = time.perf_counter() - started
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    modes = {
        "greedy": SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True),
        "sampled": SamplingParams(temperature=0.6, top_p=0.95, max_tokens=new_tokens, ignore_eos=True, seed=0),
    }
    result = {"startup_seconds": {"plain": startup_plain, "steered": startup_steered}}
    for mode, params in modes.items():
        timed_generate(plain, requests, params)  # warm-up
        timed_generate(steered, requests, params)
        rates = {"plain": [], "steered": []}
        for _ in range(rounds):
            rates["plain"].append(timed_generate(plain, requests, params))
            rates["steered"].append(timed_generate(steered, requests, params))
        medians = {arm: statistics.median(values) for arm, values in rates.items()}
        result[mode] = {"tokens_per_second": medians, "runs": rates,
                        "overhead": medians["plain"] / medians["steered"] - 1}
    stats = steering_stats(steered)
    result["gated_fraction"] = stats.gated_fraction
    del plain, steered
    return result


def rollout_speed(model: str, data: Path, problems: int, new_tokens: int, batch_size: int, dtype: str) -> dict:
    from transformers import AutoTokenizer

    from steer.integrations.vllm.decoding import vllm_decoders

    chosen = load_problems(data)[:problems]
    settings = RolloutSettings(samples=4, batch_size=batch_size, seed=0,
                               decoding=DecodingSettings(temperature=0.6, max_new_tokens=new_tokens))
    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        hf_model, tokenizer = load_model(model, device="cpu", dtype=getattr(torch, dtype))
        summary = run_rollouts(hf_model, tokenizer, chosen, Path(scratch) / "hf", settings, progress=False)
        result["hf"] = {"tokens": summary.tokens, "seconds": summary.seconds,
                        "tokens_per_second": summary.tokens_per_second}
        del hf_model
        started = time.perf_counter()
        decoder, _ = vllm_decoders(model, AutoTokenizer.from_pretrained(model), None, dtype, 0, enforce_eager=True)
        startup = time.perf_counter() - started
        summary = run_rollouts(decoder, tokenizer, chosen, Path(scratch) / "vllm", settings, progress=False)
        result["vllm"] = {"tokens": summary.tokens, "seconds": summary.seconds,
                          "tokens_per_second": summary.tokens_per_second, "startup_seconds": startup}
    result["speedup"] = result["vllm"]["tokens_per_second"] / result["hf"]["tokens_per_second"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "arithmetic.jsonl")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rollout-problems", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="The hf engine's batch (its default).")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device="cpu", dtype=getattr(torch, args.dtype))
    problems = load_problems(args.data)[: args.prompts]
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question)) for p in problems]
    with tempfile.TemporaryDirectory() as scratch:
        CorrectionHead.for_model(model, rank=16, top_k=5, tau=0.0, seed=0).save_pretrained(scratch)
        del model
        cost = steering_cost(args.model, scratch, prompts, args.new_tokens, args.rounds, args.dtype)
    rollouts = rollout_speed(args.model, args.data, args.rollout_problems, args.new_tokens, args.batch_size,
                             args.dtype)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    goal = 0.02 if torch.cuda.is_available() else 0.03
    record = {
        "command": f"python benches/vllm_throughput.py --model {args.model}",
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "vllm": __import__("vllm").__version__,
        "steering": cost, "rollouts": rollouts,
        "goals": {
            f"steering costs at most {goal:.0%} of vLLM's throughput (greedy and sampled)":
                all(cost[mode]["overhead"] <= goal for mode in ("greedy", "sampled")),
            "rollouts through vLLM at least 2x the hf engine": rollouts["speedup"] >= 2,
        },
    }
    out = ROOT / "results" / f"vllm-throughput-{Path(args.model).name}-{device.replace(' ', '-')}.json"
    atomic_write_json(out, record)
    for mode in ("greedy", "sampled"):
        rates = cost[mode]["tokens_per_second"]
        print(f"{mode}: plain {rates['plain']:.1f} tokens/s, steered {rates['steered']:.1f} "
              f"(overhead {cost[mode]['overhead']:+.1%})")
    print(f"rollouts: hf {rollouts['hf']['tokens_per_second']:.1f} tokens/s, vllm "
          f"{rollouts['vllm']['tokens_per_second']:.1f} ({rollouts['speedup']:.2f}x) -> {out}")


if __name__ == "__main__":
    main()
