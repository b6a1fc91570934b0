"""The whole method on a real model, with both label sources and the headroom report, timed stage by stage.

    python benches/real_model_loop.py --model benches/models/SmolLM2-135M-Instruct \\
        --data benches/data/arithmetic.jsonl --out benches/runs/loop-arithmetic

Splits the benchmark by position: the first `--train` problems for rollouts, the next `--heldback` for the
headroom analysis (never evaluated), the last `--test` for the held-out evaluation. Then: headroom, rollouts,
scoring, branch labels, a head from rollout advantages and one from branch labels (same rollouts, same settings
otherwise), and base against each head on the test problems (greedy). Every stage resumes in `--out`; the record
goes to `benches/results/loop-<model>-<data>-seed<S>.json` with the generated tokens each head cost.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from steer.analysis.headroom import HeadroomSettings, headroom
from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.evaluation import Arm, EvalSettings, evaluate
from steer.pipeline.folders.predictions import PredictionFolder
from steer.pipeline.labels import LabelSettings, label_branches
from steer.pipeline.metrics import mcnemar
from steer.pipeline.problems import load_problems
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import ScoreSettings, score_rollouts
from steer.pipeline.training import TrainSettings, train_head

ROOT = Path(__file__).resolve().parent


def timed(stages: dict, name: str, run):
    start = time.perf_counter()
    result = run()
    stages[name] = {"seconds": time.perf_counter() - start}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--heldback", type=int, default=60)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--label-problems", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    problems = load_problems(args.data)
    train, heldback, test = (problems[: args.train], problems[args.train : args.train + args.heldback],
                             problems[-args.test :])
    model, tokenizer = load_model(args.model, device="cpu", dtype=getattr(torch, args.dtype))
    stages: dict[str, dict] = {}
    out = args.out / f"seed{args.seed}"

    room = timed(stages, "headroom", lambda: headroom(model, tokenizer, heldback, out / "headroom", HeadroomSettings(
        max_new_tokens=args.max_new_tokens, points=2, top_k=4, batch_size=args.batch_size, seed=args.seed)))
    sampling = RolloutSettings(samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                               decoding=DecodingSettings(max_new_tokens=args.max_new_tokens))
    rollouts = timed(stages, "rollouts", lambda: run_rollouts(model, tokenizer, train, out / "rollouts", sampling))
    timed(stages, "scoring", lambda: score_rollouts(model, out / "rollouts", ScoreSettings(floor=0.3)))
    labels = timed(stages, "labels", lambda: label_branches(model, tokenizer, out / "rollouts", LabelSettings(
        points=1, top_k=4, pool_problems=args.label_problems, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed)))
    base_settings = TrainSettings(top_k=4, pool_problems=50, steps=150, warmup_steps=20, rollouts_per_step=16,
                                  seed=args.seed)
    heads = {}
    for source in ("advantage", "branches"):
        result = timed(stages, f"train-{source}", lambda s=source: train_head(
            model, out / "rollouts", replace(base_settings, labels=s)))
        result.save(out / f"head-{source}")
        heads[source] = result
    eval_settings = EvalSettings(batch_size=args.batch_size, seed=args.seed,
                                 decoding=DecodingSettings(temperature=0.0, max_new_tokens=args.max_new_tokens))
    arms = [Arm("base", model), *(Arm.steered(model, r.head, name) for name, r in heads.items())]
    summary = timed(stages, "evaluation", lambda: evaluate(model, tokenizer, {"test": test}, out / "eval",
                                                           eval_settings, arms=arms))
    predictions = PredictionFolder(out / "eval").records()
    correct = {arm.name: {r.problem_id: bool(r.correct) for r in predictions if r.arm == arm.name}
               for arm in arms}
    shared = sorted(correct["base"])
    paired = {name: {"difference": (sum(correct[name][p] for p in shared) - sum(correct["base"][p] for p in shared))
                     / len(shared),
                     **asdict(mcnemar([correct["base"][p] for p in shared], [correct[name][p] for p in shared]))}
              for name in heads}
    record = {
        "command": f"python benches/real_model_loop.py --model {args.model} --data {args.data} --out {args.out} "
                   f"--seed {args.seed} --dtype {args.dtype}",
        "args": {k: str(v) for k, v in vars(args).items()},
        "headroom": asdict(room),
        "rollouts": {"tokens": rollouts.tokens, "mean_reward": rollouts.mean_reward},
        "labels": {"tokens": labels.tokens, "points": labels.points, "tau": labels.tau},
        "heads": {name: {"tau": r.record.tau, "scale": r.record.scale, "pool": asdict(r.record.pool),
                         "selected_step": r.record.selected_step, "warnings": r.record.warnings,
                         "generated_tokens": rollouts.tokens + (labels.tokens if name == "branches" else 0)}
                  for name, r in heads.items()},
        "evaluation": summary.to_json()["benchmarks"]["test"],
        "paired_against_base": paired,
        "stages": stages,
    }
    name = f"loop-{Path(args.model).name}-{args.data.stem}-seed{args.seed}.json"
    atomic_write_json(ROOT / "results" / name, record)
    arms_summary = record["evaluation"]["arms"]
    print({arm: round(a["accuracy"], 3) for arm, a in arms_summary.items()}, paired,
          {k: round(v["seconds"]) for k, v in stages.items()})


if __name__ == "__main__":
    main()
