"""Triton kernels for the per-step decoding math (imported as `steer.kernels`).

- :mod:`steer.kernels.fused_steer`: entropy, top-k and the steering adjustment in one read of the logits.

Importing a kernel module needs Triton; `steer.functional` imports it only when the Triton path is taken, so that
`TRITON_INTERPRET=1` can still be set before that first call.
"""
