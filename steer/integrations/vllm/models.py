"""Steered variants of vLLM's causal-LM classes: `compute_logits` calls the model's own, then applies a correction
head with the math of [`steer.steer_logits`].

vLLM's logits processors see logits, never hidden states, so a head cannot be one of them. A model class can: its
`compute_logits(hidden_states)` receives the final hidden state of every row it scores (`[rows, hidden]`, the input
of the LM head, rows in the order of the logits) and returns their logits. [`SteeredModel`] is mixed into each
supported class (`Steer<Architecture>`, built from [`steer.integrations.vllm.ARCHITECTURES`] on first access of
this module's attribute). It reads what to do from the model's configuration, where `hf_overrides` put it so that it
reaches every process vLLM starts:

- `steer_head` (`str`): the head's folder or Hub id;
- `steer_enabled` (`bool`, defaults to `True`): steer, or pass the logits through (switchable at run time, see
  [`steer.integrations.vllm.SteerWorkerExtension`]).

The head is loaded and checked against the LM head's weights once they are loaded (`load_weights`): a head made for
another model raises [`HeadMismatchError`]. The logits are steered in place: `compute_logits` has just made them and
nothing else holds them (vLLM's samplers, logprobs included, read them after this call, so logprobs are the steered
model's). What [`steer.integrations.vllm.check_engine_arguments`] refuses raises [`SteerError`] here too.
"""

from __future__ import annotations

import torch
from vllm.distributed import get_tensor_model_parallel_rank

from steer.errors import SteerError
from steer.functional import steer_logits
from steer.head import CorrectionHead
from steer.integrations.vllm import ENABLED_KEY, HEAD_KEY, check_engine_arguments

latest_masks: tuple[torch.Tensor, torch.Tensor] | None = None
"""The gated and changed rows of the latest steered `compute_logits` in this process (a worker holds one model), for
[`steer.integrations.vllm.worker.SequenceCounter`], which vLLM runs next on the same rows."""


class SteeredModel:
    """The steering part of a `Steer<Architecture>` class; its other base is the vLLM model class it steers."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        check_engine_arguments({"pipeline_parallel_size": parallel.pipeline_parallel_size,
                                "speculative_config": vllm_config.speculative_config})
        head = getattr(config, HEAD_KEY, None)
        if not head:
            raise SteerError(f"{type(self).__name__} needs the model configuration key {HEAD_KEY} (a head's folder "
                             f"or Hub id): pass hf_overrides={{'{HEAD_KEY}': ...}}, or use steered_llm or steer serve")
        # not a submodule: vLLM requires every parameter of the model to come from its checkpoint
        object.__setattr__(self, "steer_head", CorrectionHead.from_pretrained(head))
        self.steer_enabled = bool(getattr(config, ENABLED_KEY, True))
        self.steer_vocab = vllm_config.model_config.get_vocab_size()
        self.steer_weight: torch.Tensor | None = None
        self.steer_counts = torch.zeros(4, dtype=torch.long)  # calls, rows, gated, changed
        # Under tensor parallelism every rank steers the same gathered logits; one rank counts.
        self.steer_counting = get_tensor_model_parallel_rank() == 0

    def _steer_output_module(self) -> torch.nn.Module:
        """The module whose weight the logits are computed from (the LM head, or the tied input embedding)."""
        module = getattr(self, "lm_head", None)
        return module if module is not None else self.model.embed_tokens

    def _steer_output_embedding(self) -> torch.Tensor:
        """The whole output embedding, `[vocab, hidden]`, without vLLM's padding rows. Under tensor parallelism
        each rank holds a slice of the vocabulary's rows, and the logits are all-gathered across ranks before
        `compute_logits` returns them; the head needs the rows of any candidate, so the slices are gathered once
        here, in the order the logits are gathered (the memory of one unsharded output embedding per rank)."""
        module = self._steer_output_module()
        weight = module.weight.detach()
        if getattr(module, "tp_size", 1) > 1:
            from vllm.distributed import tensor_model_parallel_all_gather

            weight = tensor_model_parallel_all_gather(weight.contiguous(), dim=0)
        return weight[: self.steer_vocab]

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        weight = self._steer_output_embedding()
        self.steer_head.check_embedding(weight, type(self).__name__)
        self.steer_weight = weight
        self.steer_head.to(weight.device)
        self.steer_counts = self.steer_counts.to(weight.device)
        return loaded

    @property
    def compute_logits_local(self):
        """Hidden on purpose. vLLM's V2 runner samples batch-sharded across tensor-parallel ranks wherever a model has
        `compute_logits_local`, which skips `compute_logits` and so the steering; without it, vLLM falls back to
        `compute_logits` (and says so in its log)."""
        raise AttributeError("a steered model computes full-vocabulary logits only: batch-sharded sampling would "
                             "skip the steering")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        global latest_masks
        latest_masks = None
        if logits is None or not self.steer_enabled or logits.shape[0] == 0:
            return logits
        head = self.steer_head
        correction = head.project(hidden_states).to(logits.device)
        out = steer_logits(logits, correction, self.steer_weight, head.top_k, head.tau, inplace=True)
        if self.steer_counting:
            counts = self.steer_counts  # no host-device copy here: a decoding step must not wait on the device
            counts[0] += 1
            counts[1] += logits.shape[0]
            counts[2:] += torch.stack([out.gated.sum(), out.changed.sum()])
            latest_masks = (out.gated, out.changed)
        return out.logits


def __getattr__(name: str) -> type:
    """`Steer<Architecture>`: the vLLM class of a supported architecture with [`SteeredModel`] mixed in."""
    from steer.integrations.vllm import ARCHITECTURES, STEERED_PREFIX

    architecture = name.removeprefix(STEERED_PREFIX)
    if not name.startswith(STEERED_PREFIX) or architecture not in ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, class_name = ARCHITECTURES[architecture].split(":")
    base = getattr(importlib.import_module(module), class_name)
    steered = type(name, (SteeredModel, base), {"__module__": __name__})
    globals()[name] = steered
    return steered
