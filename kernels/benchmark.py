"""Micro-benchmark of one steering step: the fused kernel against PyTorch eager, `torch.compile` and a read-only
kernel (the roofline), over a grid of batch sizes, vocabularies, dtypes and k.

Used by `steer bench kernels` and `benches/kernel.py`. On a GPU, times are medians of CUDA-event measurements
(`triton.testing.do_bench`) over input copies rotated so that the logits are not served from the L2 cache, plus the
replay time of a CUDA graph of the fused step. On the CPU the fused kernel only runs under Triton's interpreter,
which makes its times meaningless; the CPU run is a smoke test of the harness.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from steer import reference
from steer.functional import TRITON_MAX_K, interpreting, triton_available

RIVALS = ("eager", "compile", "fused", "read")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = 64  # width of the correction vectors and the output embedding used by the step
ROTATE_BYTES = 256 * 2**20  # input copies cycled through per configuration: several times a GPU's L2


@dataclass(frozen=True)
class Config:
    batch: int
    vocab: int
    dtype: str
    k: int


@dataclass
class Measurement:
    """One configuration's median times in microseconds (None where a rival did not run) and derived figures."""

    config: Config
    eager_us: float | None
    compile_us: float | None
    fused_us: float | None
    graph_us: float | None
    read_us: float | None
    bandwidth_share: float | None  # one read of the logits in the fused time, as a share of the copy bandwidth
    speedup_eager: float | None
    speedup_compile: float | None

    def row(self) -> dict:
        return {**asdict(self.config), **{k: v for k, v in asdict(self).items() if k != "config"}}


def grid(batches: Iterable[int], vocabs: Iterable[int], dtypes: Iterable[str], ks: Iterable[int]) -> list[Config]:
    return [Config(*values) for values in itertools.product(batches, vocabs, dtypes, ks)]


def timer(device: torch.device, runs: int) -> Callable[[Callable[[], object]], float]:
    """A function that returns the median time of a call in microseconds, after warm-up."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=25, rep=max(runs, 100), return_mode="median")

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)

    return cpu_time


def copy_bandwidth(device: torch.device, runs: int) -> float:
    """Measured copy bandwidth in bytes per second (bytes read plus bytes written)."""
    size = ROTATE_BYTES if device.type == "cuda" else 64 * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * size / (timer(device, runs)(lambda: target.copy_(source)) * 1e-6)


def _rotating(make: Callable[[], torch.Tensor], nbytes: int, device: torch.device) -> Callable[[], torch.Tensor]:
    copies = [make() for _ in range(max(1, ROTATE_BYTES // nbytes) if device.type == "cuda" else 1)]
    cycle = itertools.cycle(copies)
    return lambda: next(cycle)


def _graph_time(step: Callable[[torch.Tensor], object], logits: torch.Tensor, measure: Callable) -> float:
    """Replay time of a CUDA graph of `step` on a static input."""
    static = logits.clone()
    step(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)
    return measure(graph.replay)


def measure(config: Config, device: torch.device, rivals: tuple[str, ...], runs: int, bandwidth: float) -> Measurement:
    """Time the rivals on one configuration. All rows are gated (tau = 0), the worst case of the step."""
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[config.dtype]
    shape = (config.batch, config.vocab)
    nbytes = config.batch * config.vocab * dtype.itemsize
    next_logits = _rotating(lambda: torch.randn(shape, generator=generator, device=device).to(dtype), nbytes, device)
    correction = torch.randn(config.batch, HIDDEN, generator=generator, device=device)
    embedding = torch.randn(config.vocab, HIDDEN, generator=generator, device=device).to(dtype)
    time_of = timer(device, runs)

    def eager(logits: torch.Tensor) -> object:
        return reference.steer_logits(logits, correction, embedding, config.k, 0.0)

    times: dict[str, float | None] = dict.fromkeys(("eager", "compile", "fused", "graph", "read"))
    if "eager" in rivals:
        times["eager"] = time_of(lambda: eager(next_logits()))
    if "compile" in rivals:
        compiled = torch.compile(eager, dynamic=False)
        times["compile"] = time_of(lambda: compiled(next_logits()))
    if fused_runs(device, config.k) and {"fused", "read"} & set(rivals):
        from steer.kernels import fused_steer, roofline

        def fused(logits: torch.Tensor) -> object:
            return fused_steer.steer_logits(logits, correction, embedding, config.k, 0.0)

        if "fused" in rivals:
            times["fused"] = time_of(lambda: fused(next_logits()))
            if device.type == "cuda":
                times["graph"] = _graph_time(fused, next_logits(), time_of)
        if "read" in rivals:
            splits = fused_steer.default_splits(config.batch, config.vocab, 1024, device)
            times["read"] = time_of(lambda: roofline.read_rows(next_logits(), splits))
    fused_time = times["fused"]
    return Measurement(
        config, times["eager"], times["compile"], fused_time, times["graph"], times["read"],
        bandwidth_share=nbytes / (fused_time * 1e-6) / bandwidth if fused_time else None,
        speedup_eager=_ratio(times["eager"], fused_time),
        speedup_compile=_ratio(times["compile"], fused_time),
    )


def fused_runs(device: torch.device, k: int) -> bool:
    """Whether the Triton kernels can run here: on CUDA, or on the CPU under the interpreter."""
    return triton_available() and (device.type == "cuda" or interpreting()) and k <= TRITON_MAX_K


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(measurements: list[Measurement]) -> list[str]:
    """Aligned text rows: median microseconds of each rival, bandwidth share and speed-ups."""
    header = ("B", "V", "dtype", "k", "eager us", "compile us", "fused us", "graph us", "read us", "% copy bw",
              "x eager", "x compile")

    def show(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    rows = [header] + [
        (str(m.config.batch), str(m.config.vocab), m.config.dtype, str(m.config.k), show(m.eager_us, ".1f"),
         show(m.compile_us, ".1f"), show(m.fused_us, ".1f"), show(m.graph_us, ".1f"), show(m.read_us, ".1f"),
         show(m.bandwidth_share and 100 * m.bandwidth_share, ".0f"), show(m.speedup_eager, ".2f"),
         show(m.speedup_compile, ".2f"))
        for m in measurements
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
