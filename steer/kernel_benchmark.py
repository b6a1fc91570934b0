"""What a decoding step costs: the fused kernel against PyTorch rivals and the memory-bandwidth floor.

Used by `steer bench kernels` and `benches/kernel.py`; it lives outside the kernel package (`steer.kernels`), which
holds kernels, launchers and limits only. Per configuration (batch B, vocabulary V, dtype, k), every row gated
(tau = 0, the step's worst case), each rival runs the way a decoding loop pays for it:

- `fused`: `steer.steer_logits(..., inplace=True)` through the dispatcher (on CUDA), one launch;
- `eager`: the PyTorch chain (log-softmax, entropy, top-k, gather, dot products, scatter), without host syncs;
- `compile`: that chain under `torch.compile` (one compile per configuration);
- `read`: the read-only roofline kernel (one read of the logits, same tiles and split as the fused kernel);
- `copy`: a device-to-device copy of the logits (one read and one write).

Each is timed twice, over input copies rotated so that the logits are not served from the L2 cache: `eager` mode is
a loop of back-to-back calls (host overhead included, as in an eager decoding loop), `graph` mode is the replay of a
CUDA graph of those calls (what a graph-captured decoding loop pays). Bandwidth counts the bytes each rival actually
moves: one read of the logits for `fused` and `read`, a read and a write for `copy`; `roofline_share` is the fused
kernel's read bandwidth as a share of the read kernel's, measured in the same run.

On the CPU the Triton kernels only run under the interpreter and nothing is graph-captured: a smoke test of the
harness, with meaningless times.
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

import steer
from steer.functional import interpreting, triton_available
from steer.kernels.limits import MAX_K

RIVALS = ("fused", "eager", "compile", "read", "copy")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = 2048  # width of the correction vectors and of the output embedding: a 1B-class model's
ROTATE_BYTES = 128 * 2**20  # input copies cycled through per configuration: over twice an H100's 50 MB L2
MAX_COPIES = 512
GOAL_CONFIG = {"vocab": 151936, "dtype": "bf16", "k": 5}  # the goals are stated on this configuration


@dataclass(frozen=True)
class Config:
    batch: int
    vocab: int
    dtype: str
    k: int

    @property
    def logit_bytes(self) -> int:
        return self.batch * self.vocab * DTYPES[self.dtype].itemsize


@dataclass
class Measurement:
    """One configuration's times in microseconds per step (None where a rival did not run) and derived figures."""

    config: Config
    us: dict[str, float | None]  # "<rival>" (eager-mode loop) and "<rival>_graph" (CUDA graph replay)

    def _best(self, rival: str) -> float | None:
        """The graph time where there is one, else the eager one."""
        return self.us.get(f"{rival}_graph") or self.us.get(rival)

    def bandwidth(self, rival: str) -> float | None:
        """GB/s in the bytes the rival moves: a copy reads and writes the logits, the kernels read them once."""
        seconds = self._best(rival)
        moved = self.config.logit_bytes * (2 if rival == "copy" else 1)
        return moved / (seconds * 1e3) if seconds else None

    def row(self) -> dict:
        fused = self._best("fused")
        return {
            **asdict(self.config), **{f"{name}_us": value for name, value in self.us.items()},
            "fused_gb_s": self.bandwidth("fused"), "read_gb_s": self.bandwidth("read"),
            "copy_gb_s": self.bandwidth("copy"),
            "roofline_share": _ratio(self._best("read"), fused),
            "speedup_eager": _ratio(self._best("eager"), fused),
            "speedup_compile": _ratio(self._best("compile"), fused),
        }


def grid(batches: Iterable[int], vocabs: Iterable[int], dtypes: Iterable[str], ks: Iterable[int]) -> list[Config]:
    return [Config(*values) for values in itertools.product(batches, vocabs, dtypes, ks)]


def torch_step(logits: torch.Tensor, correction: torch.Tensor, embedding: torch.Tensor, k: int, tau: float):
    """The step in plain PyTorch, in place and without host synchronisation: the eager and `torch.compile` rival."""
    x = logits.float()
    log_p = torch.log_softmax(x, dim=-1)
    entropy = -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(dim=-1)
    values, indices = x.topk(k, dim=-1)
    delta = torch.bmm(embedding[indices].float(), correction.float().unsqueeze(-1)).squeeze(-1)
    gated = entropy > tau
    logits.scatter_(-1, indices, torch.where(gated.unsqueeze(-1), values + delta, values).to(logits.dtype))
    return entropy, indices, delta, gated


def measure(config: Config, device: torch.device, rivals: tuple[str, ...], runs: int) -> Measurement:
    """Time the rivals on one configuration (see the module docstring): medians over `runs` rounds, each a call on
    every input copy (at least `ROTATE_BYTES` of logits on CUDA)."""
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[config.dtype]
    copies = _copies(config.logit_bytes, device)
    inputs = [torch.randn(config.batch, config.vocab, generator=generator, device=device).to(dtype)
              for _ in range(copies)]
    correction = torch.randn(config.batch, HIDDEN, generator=generator, device=device)
    embedding = (torch.randn(config.vocab, HIDDEN, generator=generator, device=device) / HIDDEN**0.5).to(dtype)
    steps: dict[str, Callable[[torch.Tensor], object]] = {}
    if "fused" in rivals and fused_runs(device, config.k):
        from steer.kernels import fused_steer

        steer_logits = steer.steer_logits if device.type == "cuda" else fused_steer.steer_logits  # interpreter: forced
        steps["fused"] = lambda x: steer_logits(x, correction, embedding, config.k, 0.0, inplace=True)
    if "eager" in rivals:
        steps["eager"] = lambda x: torch_step(x, correction, embedding, config.k, 0.0)
    if "compile" in rivals:
        compiled = torch.compile(torch_step, dynamic=False)
        steps["compile"] = lambda x: compiled(x, correction, embedding, config.k, 0.0)
    if "read" in rivals and fused_runs(device, config.k):
        from steer.kernels import fused_steer, roofline

        splits = fused_steer.default_splits(config.batch, config.vocab, fused_steer.LAUNCH_CONFIGS[dtype].block,
                                            device)
        steps["read"] = lambda x: roofline.read_rows(x, splits)
    if "copy" in rivals:
        targets = {id(x): torch.empty_like(x) for x in inputs}
        steps["copy"] = lambda x: targets[id(x)].copy_(x)
    us: dict[str, float | None] = {}
    for name, step in steps.items():
        us[name] = _loop_time(step, inputs, runs, device)
        if device.type == "cuda":
            us[f"{name}_graph"] = _graph_time(step, inputs, runs)
    return Measurement(config, us)


def _copies(nbytes: int, device: torch.device) -> int:
    return min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)) if device.type == "cuda" else 1


def _loop_time(step: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], runs: int,
               device: torch.device) -> float:
    """Median over `runs` rounds of the time per call of a loop of back-to-back calls over every input copy."""
    for x in inputs[:3]:  # warm-up: compiles, autotunes, allocates
        step(x)
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        for x in inputs:
            step(x)
        _synchronize(device)
        times.append((time.perf_counter() - start) / len(inputs))
    return 1e6 * statistics.median(times)


def _graph_time(step: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], runs: int) -> float:
    """Median time per call of the replay of one CUDA graph that holds a call on every input copy."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for x in inputs[:3]:
            step(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            step(x)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(inputs))
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_runs(device: torch.device, k: int) -> bool:
    """Whether the Triton kernels can run here: on CUDA, or on the CPU under the interpreter."""
    return triton_available() and (device.type == "cuda" or interpreting()) and k <= MAX_K


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(measurements: list[Measurement]) -> list[str]:
    """Aligned text rows: microseconds per step (graph replay, eager loop), bandwidths, shares and speed-ups."""
    columns = [("B", "batch", "d"), ("V", "vocab", "d"), ("dtype", "dtype", "s"), ("k", "k", "d"),
               ("fused g", "fused_graph_us", ".1f"), ("fused e", "fused_us", ".1f"),
               ("read g", "read_graph_us", ".1f"), ("copy g", "copy_graph_us", ".1f"),
               ("eager g", "eager_graph_us", ".1f"), ("eager e", "eager_us", ".1f"),
               ("compile g", "compile_graph_us", ".1f"), ("fused GB/s", "fused_gb_s", ".0f"),
               ("read GB/s", "read_gb_s", ".0f"), ("copy GB/s", "copy_gb_s", ".0f"),
               ("% roofline", "roofline_share", ".0%"), ("x eager", "speedup_eager", ".1f"),
               ("x compile", "speedup_compile", ".2f")]
    rows = [[title for title, _, _ in columns]]
    for measurement in measurements:
        row = measurement.row()
        rows.append(["-" if row.get(key) is None else format(row[key], form) for _, key, form in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals (H100, bf16, V = 151936, k = 5, graph replay), checked on the rows that measure them.

    Returns one dict per goal and batch size: `goal`, `batch`, `measured`, `target`, `met`.
    """
    checks = []
    for row in rows:
        if any(row[key] != value for key, value in GOAL_CONFIG.items()) or row.get("fused_graph_us") is None:
            continue
        batch, fused = row["batch"], row["fused_graph_us"]
        if batch <= 8:
            checks.append(("step us (B <= 8)", batch, fused, 5.0, fused <= 5.0))
        if batch == 32 and row.get("read_graph_us"):
            ratio = fused / row["read_graph_us"]
            checks.append(("step / roofline time (B = 32)", batch, ratio, 1.5, ratio <= 1.5))
        if batch == 256 and row.get("roofline_share"):
            checks.append(("share of roofline read bandwidth (B = 256)", batch, row["roofline_share"], 0.8,
                           row["roofline_share"] >= 0.8))
        if row.get("speedup_eager"):
            checks.append(("speed-up over eager PyTorch", batch, row["speedup_eager"], 5.0, row["speedup_eager"] >= 5))
        if row.get("speedup_compile"):
            checks.append(("speed-up over torch.compile", batch, row["speedup_compile"], 1.0,
                           row["speedup_compile"] > 1))
    keys = ("goal", "batch", "measured", "target", "met")
    return [dict(zip(keys, check)) for check in checks]


def generate_overhead(device: torch.device, size: str = "1b", batches: Iterable[int] = (1, 16),
                      new_tokens: int = 64, runs: int = 3) -> list[dict]:
    """Time of `steer.generate` against plain `model.generate` (greedy, fixed length) on a random Llama.

    `size="1b"` is a Llama-3.2-1B-shaped model (1.2B parameters, vocabulary 128256, bf16 on CUDA); `"tiny"` a small
    one for smoke tests. The head is random and gates every step (tau = 0): the worst case of the processor. Runs
    alternate plain and steered; the overhead is the median over runs of steered / plain time, minus one.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    shapes = {
        "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
        "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2),
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shapes[size], pad_token_id=0, eos_token_id=1),
                                                 dtype=dtype).eval()
    head = steer.CorrectionHead.for_model(model, rank=16, top_k=5, tau=0.0).to(device)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(std=0.02)
    results = []
    for batch in batches:
        ids = torch.randint(2, shapes[size]["vocab_size"], (batch, 32), device=device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False)
        plain_times, steered_times = [], []
        for _ in range(runs + 1):  # the first round warms up (kernels compiled, caches allocated)
            plain_times.append(_timed(model.generate, device, **kwargs))
            steered_times.append(_timed(steer.generate, device, model, head, **kwargs))
        plain, steered = plain_times[1:], steered_times[1:]
        results.append({"size": size, "batch": batch, "new_tokens": new_tokens, "plain_s": statistics.median(plain),
                        "steered_s": statistics.median(steered),
                        "overhead": statistics.median(s / p for s, p in zip(steered, plain)) - 1})
    return results


def _timed(fn: Callable[..., object], device: torch.device, *args, **kwargs) -> float:
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    _synchronize(device)
    return time.perf_counter() - start
