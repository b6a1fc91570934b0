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
model's). Speculative decoding (several positions scored per request and step) and tensor parallelism (the LM head's
rows, which the correction reads for the top-k candidates, are sharded across ranks) raise [`SteerError`].
"""

from __future__ import annotations

import torch

from steer.errors import SteerError
from steer.functional import steer_logits
from steer.head import CorrectionHead


class SteeredModel:
    """The steering part of a `Steer<Architecture>` class; its other base is the vLLM model class it steers."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm.distributed import get_tensor_model_parallel_world_size

        config = vllm_config.model_config.hf_config
        name = type(self).__name__
        if vllm_config.speculative_config is not None:
            raise SteerError(f"{name}: steering does not support speculative decoding (method "
                             f"{vllm_config.speculative_config.method!r}), which scores several positions per request "
                             "and step; serve the steered model without a speculative config")
        if get_tensor_model_parallel_world_size() > 1:
            raise SteerError(f"{name}: steering needs tensor_parallel_size=1: under tensor parallelism the LM head's "
                             "rows, which the correction reads for each row's top-k candidates, are sharded across "
                             "ranks (pipeline and data parallelism are fine)")
        head = getattr(config, "steer_head", None)
        if not head:
            raise SteerError(f"{name} needs the model configuration key steer_head (a head's folder or Hub id): "
                             "pass hf_overrides={'steer_head': ...}, or use steered_llm or steer serve")
        # not a submodule: vLLM requires every parameter of the model to come from its checkpoint
        object.__setattr__(self, "steer_head", CorrectionHead.from_pretrained(head))
        self.steer_enabled = bool(getattr(config, "steer_enabled", True))
        self.steer_vocab = vllm_config.model_config.get_vocab_size()
        self.steer_weight: torch.Tensor | None = None
        self.steer_counts = torch.zeros(4, dtype=torch.long)  # calls, rows, gated, changed

    def _steer_output_module(self) -> torch.nn.Module:
        """The module whose weight the logits are computed from (the LM head, or the tied input embedding)."""
        module = getattr(self, "lm_head", None)
        return module if module is not None else self.model.embed_tokens

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        weight = self._steer_output_module().weight[: self.steer_vocab].detach()  # without vLLM's padding rows
        self.steer_head.check_embedding(weight, type(self).__name__)
        self.steer_weight = weight
        self.steer_head.to(weight.device)
        self.steer_counts = self.steer_counts.to(weight.device)
        return loaded

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        if logits is None or not self.steer_enabled or logits.shape[0] == 0:
            return logits
        head = self.steer_head
        correction = head.project(hidden_states).to(logits.device)
        out = steer_logits(logits, correction, self.steer_weight, head.top_k, head.tau, inplace=True)
        rows = torch.tensor([1, logits.shape[0]], device=logits.device)
        self.steer_counts += torch.cat([rows, torch.stack([out.gated.sum(), out.changed.sum()])])
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
