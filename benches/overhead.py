"""Cost of steering in `generate`: tokens per second with and without the steering processor.

The steered run uses a fresh head (it adds zero, so both runs must produce identical tokens, which is checked) with
the default tau, so the processor does all its per-step work. Runs alternate between plain and steered; the figure
of merit is the median over runs of (steered time / plain time).

    python benches/overhead.py --model tiny
    python benches/overhead.py --model benches/models/SmolLM2-135M-Instruct   # see benches/offline_models.py

Results go to benches/results/overhead-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import steer
from steer.files import atomic_write_json

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [f"What is {17 * i + 3} plus {29 * i + 11}? Answer in one sentence." for i in range(64)]


def tiny_model() -> AutoModelForCausalLM:
    """A small random Llama with a real-sized vocabulary (32000), so that the per-step logits are realistic."""
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def load(name: str, batch_size: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if name == "tiny":
        torch.manual_seed(1)
        ids = torch.randint(2, 32000, (batch_size, 24))
        return tiny_model(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(name).eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS[:batch_size]
    ]
    return model, dict(tokenizer(texts, return_tensors="pt", padding=True))


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(model, inputs, new_tokens: int, runs: int, tau: float) -> dict:
    head = steer.CorrectionHead.for_model(model, tau=tau)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    plain_times, steered_times, gated = [], [], []
    with torch.inference_mode():
        model.generate(**inputs, **settings)  # warm-up
        for run in range(runs):
            plain_time, plain = timed(lambda: model.generate(**inputs, **settings))
            steered_time, (steered, stats) = timed(
                lambda: steer.generate(model, head, **inputs, **settings, return_stats=True)
            )
            if not torch.equal(plain, steered):
                raise SystemExit("a fresh head changed the output: the processor is not a no-op at zero correction")
            plain_times.append(plain_time)
            steered_times.append(steered_time)
            gated.append(stats.gated_fraction)
            print(f"run {run + 1}/{runs}: plain {plain_time:.3f} s, steered {steered_time:.3f} s", flush=True)
    tokens = inputs["input_ids"].shape[0] * new_tokens
    ratios = [s / p for s, p in zip(steered_times, plain_times)]
    return {
        "plain_tokens_per_s": tokens / statistics.median(plain_times),
        "steered_tokens_per_s": tokens / statistics.median(steered_times),
        "median_time_ratio": statistics.median(ratios),
        "overhead_percent": 100 * (statistics.median(ratios) - 1),
        "time_ratios": ratios,
        "plain_seconds": plain_times,
        "steered_seconds": steered_times,
        "gated_fraction": statistics.mean(gated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or a model folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tau", type=float, default=1.4)
    parser.add_argument("--out", type=Path, help="JSON file (default: benches/results/overhead-<model>-<device>.json)")
    args = parser.parse_args()

    model, inputs = load(args.model, args.batch_size)
    result = measure(model, inputs, args.new_tokens, args.runs, args.tau)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    record = {
        "bench": "overhead",
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "tau": args.tau,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steer": steer.__version__,
        **result,
    }
    name = Path(args.model).name.lower() if args.model != "tiny" else "tiny"
    out = args.out or RESULTS / f"overhead-{name}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    atomic_write_json(out, record)
    print(
        f"{args.model}: plain {record['plain_tokens_per_s']:.1f} tok/s, steered {record['steered_tokens_per_s']:.1f} "
        f"tok/s, median overhead {record['overhead_percent']:+.2f}% (gated {record['gated_fraction']:.0%}) -> {out}"
    )


if __name__ == "__main__":
    main()
