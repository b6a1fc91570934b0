"""Triton kernels for the per-step decoding math (imported as `steer.kernels`)."""
