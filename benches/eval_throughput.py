"""Throughput of `steer eval` against a plain loop over `model.generate` with the same batches and sampling.

    python benches/eval_throughput.py --model benches/models/SmolLM2-135M-Instruct   # see benches/offline_models.py

Both decode the same arithmetic problems (temperature 0.6, top-p 0.95), batched `--batch-size` at a time, and count
the new tokens each sequence generated up to its end-of-sequence token. `steer eval` is also run with a head (a fresh
one: it adds zero, so its cost is steering's bookkeeping), which decodes every problem twice. The runs take turns, and
the figure kept is the median over `--rounds`. Results go to benches/results/eval-throughput-<model>.json.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from steer import CorrectionHead
from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.evaluation import EvalSettings, evaluate
from steer.pipeline.problems import Problem
from steer.pipeline.prompts import build_prompt

RESULTS = Path(__file__).parent / "results"


def arithmetic(count: int) -> list[Problem]:
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]
    return [Problem(f"add-{i}", f"What is {a} + {b}?", str(a + b), "arithmetic") for i, (a, b) in enumerate(pairs)]


def plain_loop(model, tokenizer, problems: list[Problem], settings: EvalSettings) -> tuple[int, float]:
    """New tokens and seconds of `model.generate` over the problems in batches, as a user would write it."""
    tokenizer.padding_side = "left"
    texts = [build_prompt(tokenizer, p.question, settings.instruction) for p in problems]
    eos = set(filter(None, [tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])]))
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(texts), settings.batch_size):
        batch = tokenizer(texts[first : first + settings.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(**batch, **settings.decoding.generate_kwargs(),
                                    pad_token_id=tokenizer.pad_token_id)
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            ends = [i for i, token in enumerate(row) if token in eos]
            tokens += ends[0] + 1 if ends else len(row)
    return tokens, time.perf_counter() - start


def steer_eval(model, tokenizer, problems, settings, head=None) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as out:
        run = evaluate(model, tokenizer, {"arithmetic": problems}, out, settings, head=head, progress=False).run
    return run.tokens, run.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    problems = arithmetic(args.problems)
    settings = EvalSettings(decoding=DecodingSettings(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size)
    head = CorrectionHead.for_model(model)
    runs = {"plain generate": [], "steer eval": [], "steer eval --head": []}
    for round_ in range(args.rounds):
        for name, run in (("plain generate", lambda: plain_loop(model, tokenizer, problems, settings)),
                          ("steer eval", lambda: steer_eval(model, tokenizer, problems, settings)),
                          ("steer eval --head", lambda: steer_eval(model, tokenizer, problems, settings, head))):
            tokens, seconds = run()
            runs[name].append({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
            print(f"round {round_}: {name}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s)",
                  flush=True)
    medians = {name: statistics.median(r["tokens_per_second"] for r in rs) for name, rs in runs.items()}
    atomic_write_json(RESULTS / f"eval-throughput-{Path(args.model.rstrip('/')).name}.json", {
        "command": f"python benches/eval_throughput.py --model {args.model} --problems {args.problems} "
                   f"--batch-size {args.batch_size} --max-new-tokens {args.max_new_tokens} --rounds {args.rounds}",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "median_tokens_per_second": medians,
        "steer_eval_over_plain": medians["steer eval"] / medians["plain generate"],
        "runs": runs,
    })
    print({name: round(value, 1) for name, value in medians.items()})


if __name__ == "__main__":
    main()
