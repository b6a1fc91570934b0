"""Does a model choose the better branch at labelled decision points? Branch labels read by other models.

    python benches/branch_reader.py --rollouts benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/heads/rollouts \\
        --reader base=benches/models/Qwen2.5-Coder-0.5B-Instruct \\
        --reader lora=<the "merged" folder named in benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/lora/selected.json>

`steer label` continued each of the base top-k candidates at a rollout's labelled decision points greedily and graded
the continuation. Here each reader model (the base itself, the paper's LoRA, an RL model; all with the base's
tokenizer) is teacher-forced on the rollout's prefix up to that point, and its own preference among the same k
candidates is read: how often it picks each base rank, how often the candidate it picks leads to a right answer,
against the base top-1's and the best candidate's (the oracle's) rates on the same points. The base reader is the
check that the points line up: its `picks_rank[0]` is 1 up to near-ties.

This asks of a model with weight updates what `head_generalisation.py` asks of the head's hidden-state probe: the
labels say another candidate would have succeeded at a third of the points; does anything choose it? Also recorded:
the labels' settings (which points: `placement`) and the quartiles of the points' positions in their completions.

Writes `--out` (default `benches/results/branch-reader-<model>.json`, the model being the rollouts' model folder's
name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.folders.labels import LabelFolder, LabelPoint
from steer.pipeline.folders.rollouts import RolloutFolder, sequence_length
from steer.pipeline.scoring import teacher_force, token_batches

ROOT = Path(__file__).resolve().parent
MAX_BATCH_TOKENS = 2048  # padded tokens per forward pass (its logits: this many rows of the vocabulary)


@dataclass(frozen=True)
class Point:
    """A labelled decision point: the rollout's prompt and its completion up to the point, the candidates (the base
    top-k, by rank) and whether each one's greedy continuation was graded right."""

    key: LabelPoint
    prompt_ids: list[int]
    completion_ids: list[int]  # the completion up to and including the point's own position
    candidates: list[int]
    success: list[float]


@dataclass(frozen=True)
class Reading:
    """One reader over all points: the share of points where it picks each base rank, and how often its pick, the
    base top-1 and the oracle lead to a right answer; `changed_gained`/`changed_lost`: points where it picks
    another candidate than the base top-1 and that candidate succeeds where the top-1 fails, or the reverse."""

    reader: str
    points: int
    picks_rank: list[float]
    choice_succeeds: float
    base_top1_succeeds: float
    oracle_succeeds: float
    changed_gained: int
    changed_lost: int
    expected_success: float  # under the reader's distribution renormalised over the candidates


def labelled_points(rollouts_dir: Path) -> list[Point]:
    """Every point of `rollouts_dir/labels/` with all `top_k` of its candidates labelled (an interrupted run can
    leave a point with fewer), with its rollout's tokens."""
    labels = LabelFolder.of(rollouts_dir)
    top_k = labels.recorded_settings()["top_k"]
    rollouts = {(r.problem_id, r.sample): r for r in RolloutFolder(rollouts_dir).read_records()}
    tokens: dict[LabelPoint, dict[int, int]] = defaultdict(dict)
    for record in labels.read_records():
        tokens[record.point][record.rank] = record.token
    points = []
    for key, success in sorted(labels.success().items()):
        if len(success) != top_k:
            continue
        problem_id, sample, position = key
        rollout = rollouts[(problem_id, sample)]
        points.append(Point(key, rollout.prompt_ids, rollout.completion_ids[: position + 1],
                            [tokens[key][rank] for rank in range(1, top_k + 1)], success))
    if not points:
        raise SystemExit(f"no fully labelled points in {labels.path} (run `steer label` first)")
    return points


def candidate_logprobs(model: PreTrainedModel, points: list[Point]) -> torch.Tensor:
    """`(points, k)`: the model's log-probabilities of each point's candidates, teacher-forced on its prefix
    (prefixes batched by length)."""
    order = sorted(range(len(points)), key=lambda i: sequence_length(points[i]))
    rows: list[torch.Tensor | None] = [None] * len(points)
    for batch in token_batches([points[i] for i in order], MAX_BATCH_TOKENS):
        group = [points[order[i]] for i in batch]
        for index, point, (logits, _) in zip(batch, group, teacher_force(model, group)):
            logprobs = torch.log_softmax(logits[-1].float(), dim=-1)  # the row that predicts the point's token
            rows[order[index]] = logprobs[torch.tensor(point.candidates)].cpu()
    return torch.stack(rows)


def read(name: str, logprobs: torch.Tensor, success: torch.Tensor) -> Reading:
    """What `name`'s candidate log-probabilities `(points, k)` choose, against the labels `success` `(points, k)`."""
    pick = logprobs.argmax(-1)
    chosen = success.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    top1 = success[:, 0]
    changed = pick != 0
    return Reading(
        reader=name,
        points=len(pick),
        picks_rank=torch.bincount(pick, minlength=success.shape[1]).div(len(pick)).tolist(),
        choice_succeeds=float(chosen.mean()),
        base_top1_succeeds=float(top1.mean()),
        oracle_succeeds=float(success.max(-1).values.mean()),
        changed_gained=int((changed & (chosen > top1)).sum()),
        changed_lost=int((changed & (chosen < top1)).sum()),
        expected_success=float((torch.softmax(logprobs, -1) * success).sum(-1).mean()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=Path, required=True, help="a rollouts folder with branch labels")
    parser.add_argument("--reader", action="append", required=True, metavar="NAME=MODEL",
                        help="a model to read the points with (repeatable); include the base as a check")
    parser.add_argument("--out", type=Path, help="the results file (default: results/branch-reader-<model>.json)")
    args = parser.parse_args()
    readers: dict[str, str] = {}
    for spec in args.reader:
        name, sep, path = spec.partition("=")
        if not (sep and name and path) or name in readers:
            parser.error(f"--reader {spec!r}: expected NAME=MODEL with a name used once")
        readers[name] = path
    points = labelled_points(args.rollouts)
    success = torch.tensor([p.success for p in points])
    readings = []
    for name, path in readers.items():
        model, _ = load_model(path, device="cpu", dtype=torch.float32)
        reading = read(name, candidate_logprobs(model, points), success)
        del model
        readings.append(reading)
        print(json.dumps(asdict(reading)), flush=True)
    model_name = Path(RolloutFolder(args.rollouts).recorded_settings().get("model", "model")).name
    out = args.out or ROOT / "results" / f"branch-reader-{model_name}.json"
    positions = [p.key[2] for p in points]
    atomic_write_json(out, {"command": " ".join(["python benches/branch_reader.py", *sys.argv[1:]]),
                            "rollouts": str(args.rollouts), "labels": LabelFolder.of(args.rollouts).recorded_settings(),
                            "readers": readers, "position_median": statistics.median(positions),
                            "position_quartiles": statistics.quantiles(positions, n=4) if len(points) > 1 else None,
                            "readings": [asdict(r) for r in readings]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
