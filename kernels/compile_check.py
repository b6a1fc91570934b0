"""Ahead-of-time compilation of every kernel variant for chosen GPU architectures, on a machine without a GPU.

Triton's interpreter runs a kernel's Python and never its code generator, so it accepts what a real compile rejects.
This module compiles each variant that the launchers can pick (:func:`steer.kernels.fused_steer.specializations`,
:func:`steer.kernels.roofline.specializations`) to PTX and cubin with `triton.compile` for a `GPUTarget`, which needs
no GPU (ptxas ships inside the Triton wheel). It backs the test suite's compile check and
`steer bench kernels --compile-only`.

Each report row gives the compiled metadata (warps, shared memory), optionally what `ptxas -v` says (registers, spill
bytes), and static evidence from the PTX: the `bar.sync` block-wide barriers and `ex2` exponentials on the cheapest
path through the tile loop, i.e. per tile when no candidate enters the top-k.

Example:

```python
>>> from steer.kernels.compile_check import compile_all
>>> rows = compile_all(["sm_90"], workers=2)  # doctest: +SKIP
>>> rows[0]["kernel"], rows[0]["bar_sync_per_tile"]  # doctest: +SKIP
('bf16-stats-aligned-b4096w8', 2)
```
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

ARCHS = {"sm_80": 80, "sm_90": 90}
KERNEL_MODULES = ("fused_steer", "roofline")


class CompileCheckError(RuntimeError):
    """Raised by [`compile_all`] when some variants fail to compile; the message names each, with its error."""


def variants() -> list[tuple[str, int, str]]:
    """`(module, index, name)` of every variant of every kernel module, in a stable order."""
    modules = _kernel_modules()
    return [(name, i, spec.name) for name in KERNEL_MODULES for i, spec in enumerate(modules[name].specializations())]


def compile_all(archs: list[str], workers: int | None = None, ptxas_report: bool = False) -> list[dict]:
    """Compile every variant for every architecture in `archs` (keys of `ARCHS`) in `workers` processes.

    Returns one row per (variant, architecture). Raises [`CompileCheckError`] naming every variant that failed.
    """
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        raise ValueError(f"unknown architecture {', '.join(unknown)}; choose among {', '.join(ARCHS)}")
    jobs = [(module, index, arch, ARCHS[arch], ptxas_report) for module, index, _ in variants() for arch in archs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    # Fresh processes: the interpreter flag must be off before a kernel module is imported, and forking a process
    # that holds torch's threads is unsafe.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_leave_interpreter) as pool:
        futures = [pool.submit(_compile_job, job) for job in jobs]
        results = [_result(future, job) for future, job in zip(futures, jobs)]
    failures = [row for row in results if row.get("error")]
    if failures:
        raise CompileCheckError("\n\n".join(f"{row['kernel']} ({row['arch']}): {row['error']}" for row in failures))
    return results


def _result(future, job: tuple) -> dict:
    """The job's row; a compiler that takes its process down (LLVM aborts on some errors) is a failure too."""
    try:
        return future.result()
    except BrokenProcessPool:
        module, index, arch = job[:3]
        name = _kernel_modules()[module].specializations()[index].name
        return {"kernel": name, "arch": arch, "error": "the compiling process died (a crash in Triton's code "
                "generator or in ptxas)"}


def _leave_interpreter() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset; 1 is its default


def _kernel_modules() -> dict:
    from steer.kernels import fused_steer, roofline

    return {"fused_steer": fused_steer, "roofline": roofline}


def _compile_job(job: tuple[str, int, str, int, bool]) -> dict:
    module_name, index, arch, capability, ptxas_report = job
    module = _kernel_modules()[module_name]
    spec = module.specializations()[index]
    row = {"kernel": spec.name, "arch": arch, "num_warps": spec.num_warps}
    started = time.perf_counter()
    try:
        compiled = compile_variant(module, spec, capability)
    except Exception as err:  # noqa: BLE001 - every failure is reported, with its message
        return {**row, "error": f"{type(err).__name__}: {err}"}
    ptx = compiled.asm["ptx"]
    row.update(seconds=round(time.perf_counter() - started, 2), shared_bytes=compiled.metadata.shared,
               **tile_loop_profile(ptx))
    if ptxas_report:
        row.update(ptxas_usage(ptx))
    return row


def compile_variant(module, spec, capability: int):
    """`triton.compile` of one variant (`module.compile_source(spec)`) for a compute capability, e.g. 90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = module.compile_source(spec)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": spec.num_warps})


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack frame of a PTX kernel, from `ptxas -v`: the newest of the ptxas builds inside
    the Triton wheel that accepts the PTX (Triton 3.9 emits PTX 9.x, which only its `ptxas-blackwell` reads)."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    builds = [os.path.join(folder, name) for name in ("ptxas-blackwell", "ptxas")]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        for ptxas in filter(os.path.exists, builds):
            run = subprocess.run([ptxas, "-v", f"--gpu-name={target}", source, "-o", os.path.join(scratch, "k.o")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                log = run.stderr
                break
        else:
            return {"registers": None, "spill_stores": None, "spill_loads": None, "stack_bytes": None}

    def number(pattern: str) -> int | None:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame")}


def tile_loop_profile(ptx: str) -> dict:
    """Barriers and exponentials per trip of the tile loop, on its cheapest path.

    The tile loop is the first loop (LLVM marks its header `Loop Header: Depth=1`, or a branch goes back to it); the
    cheapest path is the cycle through its header with the fewest `bar.sync`, found by Dijkstra over the PTX's basic
    blocks. That is the path of a tile that holds no top-k candidate and no new maximum: the common case after the
    first tiles.
    """
    blocks, order, header = _basic_blocks(ptx)
    if header is None:  # a one-block loop gets no header comment: take the first label a later branch goes back to
        header = next((label for position, label in enumerate(order)
                       if any(label in _successors(blocks, order, later) for later in order[position:])), None)
    if header is None:
        return {"bar_sync_per_tile": None, "ex2_per_tile": None, "bar_sync_total": ptx.count("bar.sync")}

    def cost(label: str) -> tuple[int, int]:
        body = blocks[label]
        return body.count("bar.sync"), body.count("ex2.approx")

    best: dict[str, tuple[int, int]] = {}
    queue = [(cost(header), header)]
    while queue:
        (bars, exps), label = heapq.heappop(queue)
        for successor in _successors(blocks, order, label):
            if successor == header:
                return {"bar_sync_per_tile": bars, "ex2_per_tile": exps, "bar_sync_total": ptx.count("bar.sync")}
            step = cost(successor)
            candidate = (bars + step[0], exps + step[1])
            if successor not in best or candidate < best[successor]:
                best[successor] = candidate
                heapq.heappush(queue, (candidate, successor))
    return {"bar_sync_per_tile": None, "ex2_per_tile": None, "bar_sync_total": ptx.count("bar.sync")}


def _basic_blocks(ptx: str) -> tuple[dict[str, str], list[str], str | None]:
    """PTX basic blocks in order, keyed by label (a block that starts after a branch, with no label of its own, is
    keyed `<label>+<n>`; the entry block is `""`), and the first loop header's label."""
    blocks: dict[str, list[str]] = {"": []}
    order = [""]
    header = None
    for line in ptx.splitlines():
        found = re.match(r"^(\$L__BB\d+_\d+):(.*)$", line.strip())
        if found:
            label = found.group(1)
            if header is None and "Loop Header: Depth=1" in found.group(2):
                header = label
        elif re.search(r"\bbra(\.uni)?\s", line):
            blocks[order[-1]].append(line)
            label = f"{order[-1].split('+')[0]}+{len(order)}"
        else:
            blocks[order[-1]].append(line)
            continue
        blocks[label] = []
        order.append(label)
    return {label: "\n".join(lines) for label, lines in blocks.items()}, order, header


def _successors(blocks: dict[str, str], order: list[str], label: str) -> list[str]:
    """Branch targets of a block, and the next block where control can fall through."""
    body = blocks[label]
    targets = re.findall(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)", body)
    code = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith(("//", "."))]
    ends = bool(code) and code[-1].startswith(("bra", "ret"))
    position = order.index(label)
    fallthrough = [order[position + 1]] if not ends and position + 1 < len(order) else []
    return targets + fallthrough
