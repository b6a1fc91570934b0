"""Why does (or doesn't) a head move a real model? At held-out labelled decision points, how often does each
chooser pick a candidate whose continuation succeeds: the base model (its top-1), each trained head (the top of base
plus correction), a linear probe on the hidden state, and the oracle (any successful candidate).

    python benches/head_diagnosis.py --model benches/models/SmolLM2-135M-Instruct \\
        --run benches/runs/loop-arithmetic/seed0

Reads the run of `benches/real_model_loop.py` (its rollouts, scores, branch labels and the two heads); the held-out
points are those of the problems the branch-label head held out. Writes `benches/results/diagnosis-<run>.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.head import CorrectionHead, output_embedding
from steer.models import load_model
from steer.pipeline.folders.labels import LabelFolder
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.objective import BranchBatch, branch_batch

ROOT = Path(__file__).resolve().parent
HEADS = ("advantage", "branches")


def chosen_success(batch: BranchBatch, scores: torch.Tensor) -> float:
    """Share of points where the candidate with the highest score succeeds."""
    return float(batch.success.gather(-1, scores.argmax(dim=-1, keepdim=True)).mean())


def probe_scores(train: BranchBatch, heldout: BranchBatch, steps: int = 300) -> torch.Tensor:
    """A linear probe from the hidden state to each candidate rank's success (logistic, trained on `train`)."""
    torch.manual_seed(0)
    mean, std = train.hidden.mean(0), train.hidden.std(0) + 1e-6
    probe = torch.nn.Linear(train.hidden.shape[1], train.success.shape[1])
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe((train.hidden - mean) / std), train.success)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return probe((heldout.hidden - mean) / std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args()
    model, _ = load_model(args.model, device="cpu")
    embedding = output_embedding(model).detach()
    folder = RolloutFolder(args.run / "rollouts")
    labels = LabelFolder.of(folder.path).success()
    keys = sorted({(problem_id, sample) for problem_id, sample, _ in labels})
    features = folder.scores.features(keys)
    heads = {name: CorrectionHead.from_pretrained(args.run / f"head-{name}") for name in HEADS}
    record = json.loads((args.run / "head-branches" / "training.json").read_text())
    heldout_problems = set(record["pool"]["heldout_problems"])
    top_k = heads["branches"].top_k
    points = branch_batch(features, labels, heads["branches"].tau, top_k)
    in_heldout = torch.tensor([features.keys[int(r)][0] in heldout_problems for r in points.rollout])
    train, heldout = points.select(~in_heldout), points.select(in_heldout)
    result = {
        "points": {"train": len(train), "heldout": len(heldout)},
        "base_top1": chosen_success(heldout, heldout.base),
        "oracle": float(heldout.success.max(dim=-1).values.mean()),
        "any_candidate_fails": float(heldout.success.min(dim=-1).values.eq(0).float().mean()),
        "linear_probe": chosen_success(heldout, probe_scores(train, heldout)),
        "probe_in_sample": chosen_success(train, probe_scores(train, train)),
    }
    with torch.no_grad():
        for name, head in heads.items():
            delta = head(heldout.hidden, embedding[heldout.ids])
            result[f"head_{name}"] = chosen_success(heldout, heldout.base + delta)
            result[f"head_{name}_changes_top1"] = float((heldout.base + delta).argmax(-1).ne(0).float().mean())
    out = ROOT / "results" / f"diagnosis-{args.run.parent.name}-{args.run.name}.json"
    atomic_write_json(out, {"command": f"python benches/head_diagnosis.py --model {args.model} --run {args.run}",
                            **result})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
