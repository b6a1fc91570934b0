"""What a steered vLLM engine runs in each worker beside the model: the extension that
[`steer.integrations.vllm.steering_stats`] and [`set_steering`] call through `LLM.collective_rpc` (by name; no code
is pickled), and a logits processor that counts steered steps per sequence.

vLLM's logits processors run right after `compute_logits`, on the same rows, and know which request each row
belongs to; the steered model leaves each step's gated and changed rows in [`steer.integrations.vllm.models`], and
[`SequenceCounter`] adds them up for every request that carries a key in `SamplingParams.extra_args`.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from steer.integrations.vllm import SEQUENCE_KEY, models


class SequenceCounter(LogitsProcessor):
    """Counts, per request whose `SamplingParams.extra_args` holds a [`SEQUENCE_KEY`], the decoding steps steering
    gated and those where it changed the top-1. It never changes the logits. The counts live in the worker process
    until [`SteerWorkerExtension.steer_sequence_counts`] takes them."""

    counts: dict[str, list[int]] = {}  # one model, one counter per worker process

    def __init__(self, vllm_config, device, is_pin_memory: bool) -> None:
        self.keys: dict[int, str] = {}  # row of the persistent batch -> the key of its request

    def is_argmax_invariant(self) -> bool:
        return False  # so that vLLM calls it for greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.keys.pop(index, None)
        for index, params, _, _ in batch_update.added:
            key = (params.extra_args or {}).get(SEQUENCE_KEY)
            self.keys.pop(index, None)
            if key is not None:
                self.keys[index] = key
                SequenceCounter.counts.setdefault(key, [0, 0])
        for source, target, direction in batch_update.moved:
            moving, swapped = self.keys.pop(source, None), self.keys.pop(target, None)
            if moving is not None:
                self.keys[target] = moving
            if direction == MoveDirectionality.SWAP and swapped is not None:
                self.keys[source] = swapped

    def apply(self, logits):
        masks = models.latest_masks
        if self.keys and masks is not None and masks[0].shape[0] == logits.shape[0]:
            gated, changed = (mask.tolist() for mask in masks)
            for index, key in self.keys.items():
                count = SequenceCounter.counts[key]
                count[0] += gated[index]
                count[1] += changed[index]
        return logits


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

    def steer_sequence_counts(self, keys: list[str]) -> dict[str, list[int]]:
        """`{key: [gated steps, changed steps]}` of the requests with these keys, forgotten once taken."""
        return {key: SequenceCounter.counts.pop(key) for key in keys if key in SequenceCounter.counts}
