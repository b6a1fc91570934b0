"""What a steered vLLM engine runs in each worker beside the model: the extension that
[`steer.integrations.vllm.steering_stats`] and [`set_steering`] call through `LLM.collective_rpc` (by name; no code
is pickled), and a logits processor that counts steered steps per sequence.

vLLM's logits processors run right after `compute_logits`, on the same rows, and know which request each row
belongs to; the steered model leaves each step's gated and changed rows in [`steer.integrations.vllm.models`], and
[`SequenceCounter`] adds them up for every request that carries a key in `SamplingParams.extra_args`.

vLLM has two model runners with two logits-processor interfaces: V1 (the CPU's, and wherever Triton is missing)
keys a processor's state by the row of its persistent batch and tells it of every move; V2 (the default on CUDA
since vLLM 0.32) keys it by a request slot and maps rows to slots at each step. Each runner's loader accepts only a
subclass of its own interface, and which runner an engine gets is decided inside vLLM, so [`SequenceCounter`]
implements both.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from steer.integrations.vllm import SEQUENCE_KEY, models


class SequenceCounter(V1LogitsProcessor, V2LogitsProcessor):
    """Counts, per request whose `SamplingParams.extra_args` holds a [`SEQUENCE_KEY`], the decoding steps steering
    gated and those where it changed the top-1. It never changes the logits. The counts live in the worker process
    until [`SteerWorkerExtension.steer_sequence_counts`] takes them.

    Under the V1 runner `keys` maps a row of the persistent batch to its request's key (kept up to date by
    `update_state`); under V2 it maps a request slot (set by `add_request`), and `apply` reads the row -> slot map
    of the step from its context.
    """

    counts: dict[str, list[int]] = {}  # one model, one counter per worker process

    def __init__(self, vllm_config, *runner_args) -> None:  # V1: (device, is_pin_memory); V2: (req_states,)
        self.keys: dict[int, str] = {}

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return False  # so that vLLM calls it for greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.keys.pop(index, None)
        for index, params, _, _ in batch_update.added:
            self.add_request(index, params)
        for source, target, direction in batch_update.moved:
            moving, swapped = self.keys.pop(source, None), self.keys.pop(target, None)
            if moving is not None:
                self.keys[target] = moving
            if direction == MoveDirectionality.SWAP and swapped is not None:
                self.keys[source] = swapped

    # V2 interface (add_request serves V1's added requests too)
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Start counting for the request now in row or slot `req_idx`, if it carries a key; whether it does."""
        key = (sampling_params.extra_args or {}).get(SEQUENCE_KEY)
        self.keys.pop(req_idx, None)
        if key is None:
            return False
        self.keys[req_idx] = key
        SequenceCounter.counts.setdefault(key, [0, 0])
        return True

    def apply(self, logits, ctx=None):
        """Add the latest steered step's gated and changed rows to their requests' counts; `ctx` is V2's
        `LogitsContext` (row -> slot), absent under V1 (row = persistent-batch index)."""
        masks = models.latest_masks
        if not self.keys or masks is None or masks[0].shape[0] != logits.shape[0]:
            return logits
        gated, changed = (mask.tolist() for mask in masks)
        if ctx is None:
            rows = {row: key for row, key in self.keys.items() if row < len(gated)}
        else:
            rows = {row: self.keys[slot] for row, slot in enumerate(ctx.expanded_idx_mapping.tolist())
                    if slot in self.keys}
        for row, key in rows.items():
            count = SequenceCounter.counts[key]
            count[0] += gated[row]
            count[1] += changed[row]
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

    def steer_set_scale(self, scale: float) -> None:
        self.model_runner.model.steer_head.scale = float(scale)

    def steer_sequence_counts(self, keys: list[str]) -> dict[str, list[int]]:
        """`{key: [gated steps, changed steps]}` of the requests with these keys, forgotten once taken."""
        return {key: SequenceCounter.counts.pop(key) for key in keys if key in SequenceCounter.counts}
