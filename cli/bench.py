"""`steer bench`: micro-benchmarks, run on demand."""

from __future__ import annotations

import platform
import sys

import click
import torch

from steer.cli.options import emit, json_option
from steer.store import atomic_write_json

GPU_GRID = {"batch": (1, 2, 4, 8, 16, 32, 64, 128, 256), "vocab": (32000, 128256, 151936, 262144),
            "dtype": ("bf16", "fp16", "fp32"), "k": (1, 8, 16), "rivals": ("eager", "compile", "fused", "read")}
CPU_GRID = {"batch": (1, 8), "vocab": (32000,), "dtype": ("fp32", "bf16"), "k": (8,), "rivals": ("eager",)}


@click.group()
def bench() -> None:
    """Micro-benchmarks (run on demand; results are printed and optionally saved)."""


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(part) for part in text.split(",")) if text else None


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in text.split(",")) if text else None


@bench.command()
@click.option("--batch", help="Batch sizes, comma-separated (default: 1,2,...,256 on a GPU; 1,8 on the CPU).")
@click.option("--vocab", help="Vocabulary sizes (default: 32000,128256,151936,262144 on a GPU; 32000 on the CPU).")
@click.option("--dtype", help="Logit dtypes among bf16, fp16, fp32 (default: all on a GPU; fp32,bf16 on the CPU).")
@click.option("--k", "ks", help="Candidate counts (default: 1,8,16 on a GPU; 8 on the CPU).")
@click.option("--rivals", help="Among eager, compile, fused, read (default: all on a GPU; eager on the CPU, where the "
              "fused and read kernels need TRITON_INTERPRET=1 and are only a smoke test).")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(min=1), help="Timed calls per rival.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
@json_option
def kernels(batch, vocab, dtype, ks, rivals, runs, out, as_json):
    """Time one steering step (entropy, top-k, adjustment of every row) on the fused kernel against PyTorch eager,
    torch.compile and a read-only kernel; report median microseconds, the share of copy bandwidth and speed-ups."""
    from steer.kernels import benchmark

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_GRID if device.type == "cuda" else CPU_GRID
    dtypes = _names(dtype) or defaults["dtype"]
    chosen = _names(rivals) or defaults["rivals"]
    for name, allowed, given in (("dtype", benchmark.DTYPES, dtypes), ("rival", benchmark.RIVALS, chosen)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise click.BadParameter(f"unknown {name} {', '.join(unknown)}; choose among {', '.join(allowed)}")
    configs = benchmark.grid(_ints(batch) or defaults["batch"], _ints(vocab) or defaults["vocab"], dtypes,
                             _ints(ks) or defaults["k"])
    bandwidth = benchmark.copy_bandwidth(device, runs)
    measurements = []
    with click.progressbar(configs, label="configurations", file=sys.stderr,
                           item_show_func=lambda c: c and f"B={c.batch} V={c.vocab} {c.dtype} k={c.k}") as bar:
        for config in bar:
            measurements.append(benchmark.measure(config, device, chosen, runs, bandwidth))
    report = {
        "device": benchmark.device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "copy_bandwidth_gb_s": bandwidth / 1e9, "runs": runs, "rivals": list(chosen),
        "results": [m.row() for m in measurements],
    }
    if out:
        atomic_write_json(out, report)
    emit(report, as_json, [f"{report['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s",
                           *benchmark.table(measurements), *([f"-> {out}"] if out else [])])
