"""The common base of every error `steer` raises on purpose, so that callers (and the CLI) can catch them together.

Each concrete error also derives from the built-in exception it has always been (`ValueError` or `RuntimeError`),
so code that caught those keeps working.
"""

from __future__ import annotations


class SteerError(Exception):
    """Base class of the errors raised by `steer`: the message says what was wrong and where."""


class SteeringError(SteerError, RuntimeError):
    """Raised when steering cannot serve a decoding call: it cannot tell which hidden state a step's logits came
    from, or the decoding path would skip the steering processor."""
