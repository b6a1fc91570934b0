"""Steered decoding with a `steer` correction head, as a transformers `custom_generate` method.

    model.generate(**inputs, custom_generate="<this folder or Hub repository>", trust_remote_code=True)

decodes exactly as `model.generate` does, except at decision points: where the entropy (nats) of the model's
next-token distribution exceeds `tau`, the head re-scores the top-k candidates from the final hidden state `h` (the
input of the output embedding `W_u`), adding `<W_u[j], scale * U V^T h>` to the logit of candidate `j`. Every other
logit, and every other step, is left as it was. The head (`U`, `V`, its settings and a fingerprint of the model it
was trained for) is in `steer_head.py` beside this file, written by `steer export`.

Self-contained: it needs torch, safetensors and transformers >= 5.17.0, not steer. It supports greedy search,
sampling and beam search, with your own logits processors after it. Modes that run the model several times per step
or bypass logits processors (assisted or speculative decoding, prompt lookup, classifier-free guidance, DoLa,
contrastive search, group or constrained beam search, continuous batching) raise `SteeringError` instead of
decoding unsteered.
"""

from __future__ import annotations

import base64
import copy
import math

import torch
import transformers
from packaging.version import Version
from safetensors.torch import load
from transformers import LogitsProcessor, LogitsProcessorList

from .steer_head import HEAD_CONFIG, HEAD_WEIGHTS

# transformers checks `trust_remote_code` before fetching custom_generate code only from 5.17.0 on.
MIN_TRANSFORMERS = "5.17.0"
SUPPORTED_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")
UNSUPPORTED_ARGUMENTS = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "assistant_early_exit": "self-speculative decoding",
    "negative_prompt_ids": "classifier-free guidance",
}


class SteeringError(RuntimeError):
    """Raised where steering cannot run, instead of decoding unsteered."""


def generate(model, *args, **kwargs):
    """`model.generate(*args, **kwargs)` with the correction head steering the decision points.

    Args:
        model (`PreTrainedModel`): the causal LM the head was trained for (checked: sizes and a fingerprint of its
            output embedding).
        *args, **kwargs: what `model.generate` takes; `logits_processor` entries run after the steering.

    Returns:
        What `model.generate` returns.
    """
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise SteeringError(f"this custom_generate method needs transformers >= {MIN_TRANSFORMERS} (which checks "
                            f"trust_remote_code before fetching the code); found {transformers.__version__}")
    check_supported(model, kwargs)
    with SteeringProcessor(model) as steering:
        processors = LogitsProcessorList([steering, *(kwargs.pop("logits_processor", None) or [])])
        output = type(model).generate(model, *args, logits_processor=processors, **kwargs)
    sequences = getattr(output, "sequences", output)
    prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    new_tokens = sequences.shape[-1] - (prompt.shape[-1] if isinstance(prompt, torch.Tensor) else 0)
    if steering.steps == 0 and new_tokens > 0:
        raise SteeringError("generate produced tokens without calling the logits processors: it was not steered")
    return output


def check_supported(model, kwargs: dict) -> None:
    """Raise `SteeringError` for the decoding modes that steering cannot serve."""
    for name, mode in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise SteeringError(f"steering does not support {mode} (generate argument {name!r})")
    if kwargs.get("cache_implementation") == "paged":
        raise SteeringError("steering does not support continuous batching (cache_implementation='paged'), which "
                            "runs only transformers' own logits processors")
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{key: value for key, value in kwargs.items() if key != "generation_config"})
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise SteeringError("steering does not support classifier-free guidance (guidance_scale)")
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    mode = getattr(mode, "value", mode)
    if mode not in SUPPORTED_MODES:
        raise SteeringError(f"steering supports {', '.join(SUPPORTED_MODES)}; these generate arguments select {mode}")


def fingerprint(weight: torch.Tensor) -> list[float]:
    """32 evenly spaced rows of an output embedding projected on a fixed random direction (as `steer` computes)."""
    vocab_size, hidden_size = weight.shape
    rows = torch.linspace(0, vocab_size - 1, min(32, vocab_size)).round().long()
    direction = torch.randn(hidden_size, generator=torch.Generator().manual_seed(20260511), dtype=torch.float64)
    sample = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    return (sample @ (direction / math.sqrt(hidden_size))).tolist()


def check_model(weight: torch.Tensor) -> None:
    """Raise `SteeringError` unless `weight` is the output embedding the head was trained for."""
    made_for = HEAD_CONFIG.get("model_name_or_path") or "another model"
    if tuple(weight.shape) != (HEAD_CONFIG["vocab_size"], HEAD_CONFIG["hidden_size"]):
        raise SteeringError(f"this head was trained for {made_for} (vocabulary {HEAD_CONFIG['vocab_size']}, hidden "
                            f"size {HEAD_CONFIG['hidden_size']}); this model's output embedding has shape "
                            f"{tuple(weight.shape)}")
    expected = torch.tensor(HEAD_CONFIG.get("embedding_fingerprint") or [], dtype=torch.float64)
    if len(expected):
        error = (expected - torch.tensor(fingerprint(weight), dtype=torch.float64)).abs().max()
        if error / expected.pow(2).mean().sqrt().clamp(min=1e-12) > 0.02:
            raise SteeringError(f"this head was trained for {made_for}; this model has the same sizes but another "
                                "output embedding")


class SteeringProcessor(LogitsProcessor):
    """Adds the head's correction to the top-k logits of the rows whose entropy exceeds tau.

    A forward hook on the output embedding keeps the last position's input, the final hidden state the step's
    logits come from; a step without exactly one new forward pass raises `SteeringError`. Use it as a context
    manager, so that the hook is removed.
    """

    def __init__(self, model) -> None:
        module = model.get_output_embeddings()
        self.weight = module.weight
        check_model(self.weight)
        weights = load(base64.b64decode(HEAD_WEIGHTS))
        self.up, self.down = (weights[name].to(self.weight.device) for name in ("up", "down"))
        self.top_k, self.tau, self.scale = HEAD_CONFIG["top_k"], HEAD_CONFIG["tau"], HEAD_CONFIG.get("scale", 1.0)
        self.hidden, self.forwards, self.steps, self.shape = None, 0, 0, None
        self.handle = module.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        hidden = args[0]
        self.hidden = hidden[..., -1, :].detach() if hidden.dim() > 2 else hidden.detach()
        self.forwards += 1

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        hidden, forwards, self.hidden, self.forwards = self.hidden, self.forwards, None, 0
        continuing = self.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
        self.shape = tuple(input_ids.shape)
        if forwards == 0 or (continuing and forwards > 1) or hidden.shape[0] != scores.shape[0]:
            raise SteeringError("this step's logits do not come from exactly one forward pass of the model "
                                "(a decoding mode that scores several positions per forward, or runs the model twice)")
        self.steps += 1
        correction = (hidden.to(self.up.device, self.up.dtype) @ self.down) @ self.up.T
        correction = correction if self.scale == 1.0 else correction * self.scale
        return steer(scores, correction.to(scores.device), self.weight.to(scores.device), self.top_k, self.tau)

    def __enter__(self) -> SteeringProcessor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


def steer(logits: torch.Tensor, correction: torch.Tensor, weight: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """The steered logits `[B, V]` (same dtype): top-k logits of rows with entropy > tau get `<W_u[j], correction>`."""
    x = logits.float()
    z = (x - x.amax(dim=-1, keepdim=True)).clamp(min=-1e4)  # -inf entries: e^z = 0 and z e^z = 0
    e = z.exp()
    d = e.sum(dim=-1)
    entropy = d.log() - (e * z).sum(dim=-1) / d
    values, indices = torch.topk(x, k, dim=-1)
    gated = (entropy > tau).unsqueeze(-1)
    delta = torch.bmm(weight[indices].float(), correction.float().unsqueeze(-1)).squeeze(-1)
    delta = delta - delta.mean(dim=-1, keepdim=True)  # the head re-ranks the candidates, it does not move them
    new_values = torch.where(gated, values + delta.masked_fill(~gated, 0.0), values).to(logits.dtype)
    return logits.clone().scatter_(-1, indices, new_values)
