"""`steer.generate`: `model.generate` with a correction head, in one line, refusing what it could not steer.

`generate` reaches the logits processors only in its own decoding loops (greedy search, sampling, beam search).
Other paths would drop the [`SteeringProcessor`] silently or feed it logits it cannot pair with a hidden state:
continuous batching (`cache_implementation="paged"`), a `custom_generate` method, the modes transformers moved to
Hub repositories (DoLa, contrastive search, group and constrained beam search), and the modes that score several
positions per forward or run the model twice per step (assisted and speculative decoding, prompt lookup,
classifier-free guidance). [`check_supported`] refuses all of them before decoding, and [`check_steered`] refuses a
result that was decoded without a single steering step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from steer.head import CorrectionHead
from steer.processor import SteeringError, SteeringProcessor, SteeringStats

# generate() arguments that make the model score several positions per forward, or run it twice per step.
_UNSUPPORTED = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "assistant_early_exit": "self-speculative decoding",
    "negative_prompt_ids": "classifier-free guidance",
}
# The generation modes whose decoding loop calls the logits processors once per step, after one forward pass.
SUPPORTED_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def generate(
    model: nn.Module,
    head: CorrectionHead,
    *,
    return_stats: bool = False,
    **generate_kwargs: Any,
) -> Any:
    """Run `model.generate(**generate_kwargs)` with `head` steering the decision points.

    The steering processor runs first among any `logits_processor` you pass, so it sees the model's own
    distribution, and later processors (and sampling warpers such as temperature and top-p) see the steered one.

    Args:
        model (`PreTrainedModel`): a causal LM.
        head ([`CorrectionHead`]): a head made for `model`.
        return_stats (`bool`, defaults to `False`): also return the [`SteeringStats`] of this call.
        **generate_kwargs: anything `model.generate` takes, except what steering cannot serve (see
            [`check_supported`]), which raises `SteeringError`.

    Returns:
        What `model.generate` returns, or `(that, SteeringStats)` with `return_stats=True`.

    Example:

    ```python
    >>> import steer
    >>> ids = steer.generate(model, head, **tokenizer("2+2=", return_tensors="pt"), max_new_tokens=8)  # doctest: +SKIP
    ```
    """
    config = check_supported(model, generate_kwargs)
    # generate keeps the scores it hands the processors as the raw logits of `output_logits=True`; otherwise nobody
    # keeps them, and steering them in place saves a copy of [B, V] per step
    with SteeringProcessor(model, head, inplace=not config.output_logits) as steering:
        processors = LogitsProcessorList([steering, *(generate_kwargs.pop("logits_processor", None) or [])])
        output = model.generate(logits_processor=processors, **generate_kwargs)
        stats: SteeringStats = steering.stats
    check_steered(stats, output, generate_kwargs)
    return (output, stats) if return_stats else output


def check_supported(model: nn.Module, generate_kwargs: dict[str, Any]) -> GenerationConfig:
    """Raise [`SteeringError`] if `model.generate(**generate_kwargs)` would not run a steering processor once per
    step after one forward pass; otherwise return the generation config that call would use.

    Refused: assisted and speculative decoding, prompt lookup, classifier-free guidance (several positions per
    forward, or two forwards per step); continuous batching (`cache_implementation="paged"`) and `custom_generate`
    (they replace the decoding loop, and continuous batching ignores `logits_processor`); and every generation mode
    outside [`SUPPORTED_MODES`] (DoLa, contrastive search, group and constrained beam search, which transformers
    loads from Hub repositories), as selected by `generate_kwargs` over the model's generation config.

    Args:
        model (`PreTrainedModel`): the model that would decode.
        generate_kwargs (`dict[str, Any]`): the keyword arguments of that `generate` call.
    """
    for name, mode in _UNSUPPORTED.items():
        if generate_kwargs.get(name) is not None:
            raise SteeringError(f"steering does not support {mode} (generate argument {name!r})")
    if generate_kwargs.get("custom_generate") is not None:
        raise SteeringError("steering does not support custom_generate: it replaces the decoding loop, which may not "
                            "call the logits processors (to share a head as a custom_generate method: steer export)")
    if generate_kwargs.get("cache_implementation") == "paged":
        raise SteeringError("steering does not support continuous batching (generate argument "
                            "cache_implementation='paged'): it runs only transformers' own logits processors")
    config = copy.deepcopy(generate_kwargs.get("generation_config") or model.generation_config)
    config.update(**{key: value for key, value in generate_kwargs.items() if key != "generation_config"})
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise SteeringError("steering does not support classifier-free guidance (guidance_scale)")
    mode = config.get_generation_mode(generate_kwargs.get("assistant_model"))
    mode = getattr(mode, "value", mode)  # a str enum: its value is the name
    if mode not in SUPPORTED_MODES:
        raise SteeringError(f"steering supports {', '.join(SUPPORTED_MODES)}; these generate arguments select "
                            f"{mode}, whose decoding loop does not call the logits processors once per forward pass")
    return config


def check_steered(stats: SteeringStats, output: Any, generate_kwargs: dict[str, Any]) -> None:
    """Raise [`SteeringError`] if `generate` returned new tokens although the steering processor never ran (a
    decoding path that skips logits processors).

    Args:
        stats ([`SteeringStats`]): the processor's counters for this call.
        output (`torch.LongTensor` or `ModelOutput`): what `generate` returned.
        generate_kwargs (`dict[str, Any]`): the arguments of the call (`input_ids` or `inputs` give the prompt length).
    """
    if stats.steps:
        return
    sequences = getattr(output, "sequences", output)
    prompt = generate_kwargs.get("input_ids", generate_kwargs.get("inputs"))
    prompt_length = prompt.shape[-1] if isinstance(prompt, torch.Tensor) else 0
    if isinstance(sequences, torch.Tensor) and sequences.shape[-1] > prompt_length:
        raise SteeringError("generate produced new tokens without calling the logits processors: this decoding path "
                            "skips them, so the output is not steered")
