"""Which engine and dtype decode a model fastest on this machine, and how often a token budget truncates.

    python benches/engine_speed.py --model benches/models/Qwen2.5-Coder-0.5B-Instruct \
        --data ../shared/data/gsm8k/train.jsonl --problems 64 --max-new-tokens 128

Each variant (engine x dtype) samples the same prompts (temperature 0.6, top-p 0.95, the rollout defaults, each
prompt seeded as `steer rollout` seeds it) through the `Decoder` that `steer rollout` and `steer eval` use: `hf`
(`model.generate`, batched `--hf-batch` at a time) and `vllm` (vLLM's CPU build, one call of `--vllm-batch`
prompts). Variants run one after another in this process (never two at once). Greedy agreement of bfloat16 with
float32 is reported for each engine on the same prompts (share of completions identical token for token).

`--truncation 384,512` then decodes `--truncation-problems` prompts once with the fastest variant, sampled at
T 0.6 up to the largest budget, and reports for each budget the share of completions that budget would cut (a
completion that stops within a smaller budget decodes the same under it: the same seed, the same tokens).
Writes `benches/results/engine-speed-<model>.json`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.pipeline.decoding import Completion, decode_units
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.settings import DEFAULT_INSTRUCTION, DecodingSettings

RESULTS = Path(__file__).parent / "results"
SEED = 0


@dataclass(frozen=True)
class Variant:
    engine: str
    dtype: str
    cpu_bind: str | None  # vLLM's VLLM_CPU_OMP_THREADS_BIND (None for hf)
    tokens_per_second: float
    seconds: float
    tokens: int
    greedy_agreement_with_float32: float | None = None


def make_decoder(engine: str, model: str, dtype: str, threads: int):
    """A `Decoder` of `steer rollout` for `engine` and `dtype` (the hf one is the model itself)."""
    if engine == "hf":
        from steer.models import load_model

        torch.set_num_threads(threads)
        hf_model, tokenizer = load_model(model, device="cpu", dtype=getattr(torch, dtype))
        return hf_model, tokenizer
    from transformers import AutoTokenizer

    from steer.integrations.vllm.decoding import vllm_decoders

    tokenizer = AutoTokenizer.from_pretrained(model)
    decoder, _ = vllm_decoders(model, tokenizer, None, dtype, SEED)
    return decoder, tokenizer


def decode(decoder, tokenizer, prompts: list[list[int]], settings: DecodingSettings, batch: int) -> list[Completion]:
    """All `prompts`, `batch` at a time, each keyed by its index as `steer rollout` keys a sample."""
    completions: list[Completion] = []
    for start in range(0, len(prompts), batch):
        keys = [(f"p{i}", 0) for i in range(start, min(start + batch, len(prompts)))]
        completions += decode_units(decoder, tokenizer, prompts[start:start + batch], settings, SEED, keys)
    return completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--vllm-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    parser.add_argument("--vllm-binds", default="auto,0-1",
                        help="values of VLLM_CPU_OMP_THREADS_BIND to try: vLLM's 'auto' keeps one core for its "
                             "scheduler (on 2 cores, the worker gets one), '0-1' gives the worker both")
    parser.add_argument("--truncation", default="384,512", help="budgets to report truncation at ('' skips it)")
    parser.add_argument("--truncation-problems", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    problems = load_problems(args.data, limit=max(args.problems, args.truncation_problems))
    sampled = DecodingSettings(temperature=0.6, top_p=0.95, max_new_tokens=args.max_new_tokens)
    greedy = DecodingSettings(temperature=0.0, max_new_tokens=args.max_new_tokens)
    variants: list[Variant] = []
    truncation: dict[str, float] = {}
    fastest: Variant | None = None
    runs = [(engine, bind) for engine in args.engines.split(",")
            for bind in (args.vllm_binds.split(",") if engine == "vllm" else [None])]
    for engine, bind in runs:
        greedy_ids: dict[str, list[list[int]]] = {}
        for dtype in args.dtypes.split(","):
            if bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            decoder, tokenizer = make_decoder(engine, args.model, dtype, args.threads)
            prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, DEFAULT_INSTRUCTION))
                       for p in problems]
            batch = args.hf_batch if engine == "hf" else args.vllm_batch
            decode(decoder, tokenizer, prompts[:4], sampled, batch)  # warm-up
            start = time.perf_counter()
            completions = decode(decoder, tokenizer, prompts[: args.problems], sampled, batch)
            seconds = time.perf_counter() - start
            tokens = sum(c.steps for c in completions)
            greedy_ids[dtype] = [c.token_ids for c in decode(decoder, tokenizer, prompts[: args.problems], greedy,
                                                              batch)]
            agreement = None
            if dtype != "float32" and "float32" in greedy_ids:
                agreement = statistics.mean(a == b for a, b in zip(greedy_ids[dtype], greedy_ids["float32"]))
            variants.append(Variant(engine, dtype, bind, tokens / seconds, seconds, tokens, agreement))
            print(f"{engine:5s} {bind or '':5s} {dtype:9s} {tokens / seconds:7.1f} tokens/s "
                  f"({tokens} tokens in {seconds:.0f} s)"
                  + (f", greedy agreement with float32 {agreement:.2f}" if agreement is not None else ""), flush=True)
            fastest = max(variants, key=lambda v: v.tokens_per_second)
            del decoder
            gc.collect()

    budgets = sorted(int(b) for b in args.truncation.split(",") if b)
    if budgets and fastest is not None:
        if fastest.cpu_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = fastest.cpu_bind
        decoder, tokenizer = make_decoder(fastest.engine, args.model, fastest.dtype, args.threads)
        prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question, DEFAULT_INSTRUCTION))
                   for p in problems[: args.truncation_problems]]
        long = DecodingSettings(temperature=0.6, top_p=0.95, max_new_tokens=budgets[-1])
        batch = args.hf_batch if fastest.engine == "hf" else args.vllm_batch
        completions = decode(decoder, tokenizer, prompts, long, batch)
        lengths = [c.steps if c.finish_reason == "stop" else budgets[-1] + 1 for c in completions]
        truncation = {str(b): statistics.mean(n > b for n in lengths) for b in budgets}
        print(f"truncation with {fastest.engine} {fastest.dtype} at T 0.6 over {len(prompts)} problems: "
              + ", ".join(f"{b} tokens {share:.1%}" for b, share in truncation.items())
              + f"; median completion {statistics.median(c.steps for c in completions):.0f} tokens", flush=True)

    out = args.out or RESULTS / f"engine-speed-{Path(args.model).name}.json"
    atomic_write_json(out, {
        "command": "python benches/engine_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                    "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()},
        "problems": args.problems, "max_new_tokens": args.max_new_tokens,
        "variants": [asdict(v) for v in variants],
        "fastest": asdict(fastest) if fastest else None,
        "truncation": truncation, "truncation_problems": args.truncation_problems,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
