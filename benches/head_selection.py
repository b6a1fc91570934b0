"""How stable a head's checkpoint and strength are: the same rollouts trained at several seeds.

    python benches/head_selection.py --family word_problems
    python benches/head_selection.py --model benches/models/Qwen2.5-Coder-0.5B-Instruct \
        --rollouts benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/heads/rollouts

`train_head` keeps a checkpoint and then a strength (`scale`) by their held-out gain (the SmolLM2 results were
made when it kept the largest; it now keeps the earliest and smallest within one standard error of the best, and
the untrained head unless the best is `null_margin` standard errors above zero), where the held-out points come
from a fifth of the pool's problems, drawn with the training seed.
On a real model the pool is small (problems with both right and wrong rollouts), so that fifth is 4 to 8 problems.
This trains both heads of a table run (`benches/heads.py`, library defaults) at `--seeds` seeds, which changes the
held-out problems and the order of training batches and nothing else, and reports what each seed kept. Training
reads cached features only (no decoding), so the whole run takes about a minute on 2 cores.

Writes `benches/results/head_selection-<family>.json` (`head_selection-<model>.json` with `--rollouts`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from families import FAMILIES
from heads import LABEL_SOURCES

from steer.files import atomic_write_json
from steer.models import load_model
from steer.pipeline.folders.labels import LabelFolder
from steer.pipeline.training import train_head
from steer.settings import TrainSettings

ROOT = Path(__file__).resolve().parent


def selections(model, rollouts: Path, labels: str, seeds: int) -> list[dict]:
    """One record per seed: the held-out problems and points, the kept step and scale, and the held-out gains."""
    rows = []
    for seed in range(seeds):
        record = train_head(model, rollouts, TrainSettings(labels=labels, seed=seed), progress=False).record
        gain_at = {e.step: e.gain for e in record.heldout}
        best = max(record.heldout, key=lambda e: e.gain) if record.heldout else None
        rows.append({"seed": seed, "heldout_problems": record.pool.heldout_problems,
                     "heldout_points": record.pool.heldout_points, "selected_step": record.selected_step,
                     "best_gain": best.gain if best else None, "best_gain_se": best.gain_se if best else None,
                     "scale": record.scale, "gain_at_selected_step": gain_at.get(record.selected_step),
                     "heldout_gain_range": [min(gain_at.values()), max(gain_at.values())] if gain_at else None,
                     "scale_gains": record.scale_gains})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, help="the SmolLM2 table run of this family")
    parser.add_argument("--rollouts", type=Path, help="or a scored rollouts folder (labelled, for the branch head)")
    parser.add_argument("--model", help="the model the rollouts were scored with (default with --family: the "
                        "offline SmolLM2-135M-Instruct)")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if (args.family is None) == (args.rollouts is None):
        parser.error("give one of --family and --rollouts")
    if args.rollouts and not args.model:
        parser.error("--rollouts needs --model")
    args.model = args.model or str(ROOT / "models" / "SmolLM2-135M-Instruct")
    rollouts = args.rollouts or ROOT / "runs" / f"table-{args.family}" / "heads" / "rollouts"
    if not (rollouts / "rollouts.jsonl").exists():
        sys.exit(f"no rollouts in {rollouts}: run `python benches/paper_table_real.py --family {args.family}` first"
                 if args.family else f"no rollouts in {rollouts}")
    model, _ = load_model(args.model, device="cpu", dtype=torch.float32)
    report = {"command": " ".join(["python benches/head_selection.py", *sys.argv[1:]]),
              "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "rollouts": str(rollouts),
              "null_margin": TrainSettings.null_margin,
              "heads": {name: selections(model, rollouts, source, args.seeds)
                        for name, source in LABEL_SOURCES.items()
                        if source != "branches" or LabelFolder.of(rollouts).records_path.exists()}}
    for name, rows in report["heads"].items():
        for row in rows:
            gain = row["gain_at_selected_step"]
            print(f"{name:15s} seed {row['seed']}: {len(row['heldout_problems'])} held-out problems "
                  f"({row['heldout_points']} points), step {row['selected_step']}, scale {row['scale']}, "
                  f"held-out gain {'-' if gain is None else format(gain, '.3f')}")
    out = ROOT / "results" / f"head_selection-{args.family or Path(args.model).name}.json"
    atomic_write_json(out, report)
    print(json.dumps({"wrote": str(out)}))


if __name__ == "__main__":
    main()
