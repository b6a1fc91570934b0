"""The fused steering kernel against PyTorch eager, torch.compile and a read-only kernel, over the full grid.

    python benches/kernel.py    # on a GPU: B 1..256 x V {32000, 128256, 151936, 262144} x 3 dtypes x k {1, 8, 16}

Results go to benches/results/kernel-<device>.json (`steer bench kernels --help` for a smaller grid). Without a GPU
this runs the CPU grid of eager PyTorch only: the kernel needs a GPU to be timed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from steer.cli.main import main as steer_main
from steer.kernels.benchmark import device_name

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    steer_main(["bench", "kernels", "--out", str(RESULTS / f"kernel-{slug}.json"), *sys.argv[1:]])
