"""The fused steering step against PyTorch eager, torch.compile, the read-only roofline kernel and a device copy.

    python benches/kernel.py                      # on a GPU: the goal grid (bf16, V 151936, k 5, B 1..256)
    python benches/kernel.py --vocab 32000,262144 --dtype fp16,fp32 --k 1,16 --rivals fused,read,copy
    python benches/kernel.py --generate-overhead  # instead: steer.generate against generate, 1B-class random Llama

Other arguments go to `steer bench kernels` (see its --help). Results go to benches/results/kernel-<device>.json, or
generate-overhead-<device>.json (goal: steered at most 2% slower). Without a GPU this times eager PyTorch and a copy
only (the kernel needs a GPU to be timed), and the generate comparison runs on a tiny Llama.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from steer.cli.main import main as steer_main
from steer.files import atomic_write_json
from steer.kernel_benchmark import device_name, generate_overhead

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    if sys.argv[1:] == ["--generate-overhead"]:
        results = generate_overhead(device, size="1b" if device.type == "cuda" else "tiny")
        report = {"device": device_name(device), "torch": torch.__version__, "goal_overhead": 0.02,
                  "results": results, "met": all(row["overhead"] <= 0.02 for row in results)}
        atomic_write_json(RESULTS / f"generate-overhead-{slug}.json", report)
        print(json.dumps(report, indent=1))
    else:
        steer_main(["bench", "kernels", "--out", str(RESULTS / f"kernel-{slug}.json"), *sys.argv[1:]])
