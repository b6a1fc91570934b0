"""The worker extension of a steered vLLM engine: what [`steer.integrations.vllm.steering_stats`] and
[`set_steering`] call in every worker through `LLM.collective_rpc`, by name (no code is pickled)."""

from __future__ import annotations


class SteerWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self.model_runner.model` is the steered model."""

    def steer_stats(self, reset: bool = False) -> list[int]:
        """`[compute_logits calls, rows, gated rows, changed rows]` since the start or the last reset."""
        model = self.model_runner.model
        counts = model.steer_counts.tolist()
        if reset:
            model.steer_counts.zero_()
        return counts

    def steer_set_enabled(self, enabled: bool) -> None:
        self.model_runner.model.steer_enabled = bool(enabled)
