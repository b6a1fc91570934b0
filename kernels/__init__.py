"""Triton kernels for the per-step decoding math (imported as `steer.kernels`).

- :mod:`steer.kernels.limits`: what the kernel serves (k, dtypes), importable without Triton;
- :mod:`steer.kernels.fused_steer`: entropy, top-k and the steering adjustment in one launch and one read of the
  logits, with its launcher and the list of every variant it can launch;
- :mod:`steer.kernels.roofline`: a read-only kernel, the bandwidth floor for benchmarks;
- :mod:`steer.kernels.compile_check`: ahead-of-time compilation of every variant for GPU targets, without a GPU.

The package holds kernels, their launchers and limits, as Liger-Kernel's `ops/` does; what measures them lives
beside the other benchmarks: :mod:`steer.kernel_benchmark` (the step's cost against PyTorch rivals and the floor,
`steer bench kernels` and `benches/kernel.py`), and tests in `tests/test_kernels.py`.

Importing a kernel module needs Triton; `steer.functional` imports it only when the Triton path is taken, so that
`TRITON_INTERPRET=1` can still be set before that first call.
"""

if __name__ == "kernels":  # imported from a clone's root, where this folder would shadow an installed `kernels`
    from steer.shadowing import yield_to_installed

    yield_to_installed(__name__, __file__)
