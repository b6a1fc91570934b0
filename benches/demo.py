"""`steer demo` on the built-in world at several seeds: base and steered held-out accuracy, and wall time.

    python benches/demo.py --seeds 0 1 2 3 4

Each seed draws its own training and test problems, rollouts and head. Results go to benches/results/demo.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.world.demo import DemoSettings, run_demo

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            result = run_demo(out, settings=replace(DemoSettings(), seed=seed), progress=False)
        runs.append({"seed": seed, "base_accuracy": result.base_accuracy, "steered_accuracy": result.steered_accuracy,
                     "difference": result.steered_accuracy - result.base_accuracy,
                     "p_value": result.paired_test.p_value, "gated_fraction": result.gated_fraction,
                     "changed_fraction": result.changed_fraction, "seconds": round(result.seconds, 1)})
        print(runs[-1], flush=True)
    differences = [run["difference"] for run in runs]
    atomic_write_json(RESULTS / "demo.json", {
        "command": "python benches/demo.py --seeds " + " ".join(map(str, args.seeds)),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "settings": asdict(DemoSettings()),
        "runs": runs,
        "mean_difference": statistics.mean(differences),
        "min_difference": min(differences),
        "max_seconds": max(run["seconds"] for run in runs),
    })


if __name__ == "__main__":
    main()
