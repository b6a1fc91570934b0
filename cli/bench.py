"""`steer bench`: micro-benchmarks, run on demand."""

from __future__ import annotations

import platform
import sys

import click

from steer.cli.options import emit, json_option
from steer.files import atomic_write_json

# The goal configuration over the batch sizes of decoding; pass --vocab/--dtype/--k for more (each
# configuration costs a torch.compile of the PyTorch rival).
GPU_GRID = {"batch": (1, 2, 4, 8, 16, 32, 64, 128, 256), "vocab": (151936,), "dtype": ("bf16",), "k": (5,),
            "rivals": ("fused", "eager", "compile", "read", "copy")}
CPU_GRID = {"batch": (1, 8), "vocab": (32000,), "dtype": ("fp32", "bf16"), "k": (8,), "rivals": ("eager", "copy")}


@click.group()
def bench() -> None:
    """Micro-benchmarks (run on demand; results are printed and optionally saved)."""


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(part) for part in text.split(",")) if text else None


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in text.split(",")) if text else None


@bench.command()
@click.option("--batch", help="Batch sizes, comma-separated (default: 1,2,...,256 on a GPU; 1,8 on the CPU).")
@click.option("--vocab", help="Vocabulary sizes (default: 151936 on a GPU; 32000 on the CPU).")
@click.option("--dtype", help="Logit dtypes among bf16, fp16, fp32 (default: bf16 on a GPU; fp32,bf16 on the CPU).")
@click.option("--k", "ks", help="Candidate counts (default: 5 on a GPU; 8 on the CPU).")
@click.option("--rivals", help="Among fused, eager, compile, read, copy (default: all on a GPU; eager,copy on the CPU, "
              "where the fused and read kernels need TRITON_INTERPRET=1 and are only a smoke test).")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed rounds per rival; a round calls it once on each rotated input copy (128 MiB of logits).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
@click.option("--compile-only", is_flag=True, help="Instead of timing, compile every kernel variant the launchers can "
              "pick for GPU architectures (no GPU needed) and report registers, spills and shared memory.")
@click.option("--arch", "archs", multiple=True, type=click.Choice(["sm_80", "sm_90"]),
              help="With --compile-only: the architectures (repeatable; default sm_80 and sm_90).")
@click.option("--workers", type=click.IntRange(min=1), help="With --compile-only: compiling processes (default: "
              "one per CPU).")
@json_option
def kernels(batch, vocab, dtype, ks, rivals, runs, out, compile_only, archs, workers, as_json):
    """Time one steering step (entropy, top-k, adjustment of every row, in place) as a decoding loop pays it, eager
    and under CUDA-graph replay: the fused kernel against PyTorch eager, torch.compile, the read-only roofline kernel
    and a device copy, with the bandwidth each moves. With --compile-only, compile the kernels instead."""
    if compile_only:
        _compile_only(list(archs) or ["sm_80", "sm_90"], workers, out, as_json)
        return
    import torch

    from steer import kernel_benchmark as benchmark

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
    measurements = []
    with click.progressbar(configs, label="configurations", file=sys.stderr,
                           item_show_func=lambda c: c and f"B={c.batch} V={c.vocab} {c.dtype} k={c.k}") as bar:
        for config in bar:
            measurements.append(benchmark.measure(config, device, chosen, runs))
    rows = [m.row() for m in measurements]
    report = {
        "device": benchmark.device_name(device), "torch": torch.__version__, "triton": _triton_version(),
        "python": platform.python_version(), "runs": runs, "rivals": list(chosen), "results": rows,
        "goals": benchmark.goals(rows),
    }
    if out:
        atomic_write_json(out, report)
    goal_lines = [f"goal {g['goal']} at B={g['batch']}: {g['measured']:.3g} against {g['target']:g} "
                  f"({'met' if g['met'] else 'NOT met'})" for g in report["goals"]]
    emit(report, as_json, [f"{report['device']} (us per step: g = CUDA graph replay, e = eager loop)",
                           *benchmark.table(measurements), *goal_lines, *([f"-> {out}"] if out else [])])


def _compile_only(archs: list[str], workers: int | None, out: str | None, as_json: bool) -> None:
    from steer.kernels import compile_check

    try:
        rows = compile_check.compile_all(archs, workers=workers, ptxas_report=True)
    except compile_check.CompileCheckError as err:
        raise click.ClickException(f"kernels failed to compile:\n{err}") from err
    report = {"triton": _triton_version(), "archs": archs, "results": rows}
    if out:
        atomic_write_json(out, report)
    columns = [("kernel", "kernel"), ("arch", "arch"), ("warps", "num_warps"), ("regs", "registers"),
               ("spill st", "spill_stores"), ("spill ld", "spill_loads"), ("smem B", "shared_bytes"),
               ("bar/tile", "bar_sync_per_tile"), ("ex2/tile", "ex2_per_tile"), ("s", "seconds")]
    table = [[title for title, _ in columns]] + [["-" if row.get(key) is None else str(row[key])
                                                  for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in table]
    emit(report, as_json, [f"triton {report['triton']}: {len(rows)} variants compiled", *lines,
                           *([f"-> {out}"] if out else [])])


def _triton_version() -> str | None:
    from steer.functional import triton_available

    if not triton_available():
        return None
    import triton

    return triton.__version__
