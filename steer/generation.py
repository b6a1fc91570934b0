"""`steer.generate`: `model.generate` with a correction head, in one line."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import LogitsProcessorList

from steer.head import CorrectionHead
from steer.processor import SteeringError, SteeringProcessor, SteeringStats

# generate() arguments that make the model score several positions per forward, or run it twice per step.
_UNSUPPORTED = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "assistant_early_exit": "self-speculative decoding",
    "negative_prompt_ids": "classifier-free guidance",
}


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
        **generate_kwargs: anything `model.generate` takes, except the decoding modes steering cannot serve
            (assisted/speculative generation, prompt lookup, classifier-free guidance), which raise `SteeringError`.

    Returns:
        What `model.generate` returns, or `(that, SteeringStats)` with `return_stats=True`.

    Example:

    ```python
    >>> import steer
    >>> ids = steer.generate(model, head, **tokenizer("2+2=", return_tensors="pt"), max_new_tokens=8)  # doctest: +SKIP
    ```
    """
    for name, mode in _UNSUPPORTED.items():
        if generate_kwargs.get(name) is not None:
            raise SteeringError(f"steering does not support {mode} (generate argument {name!r})")
    guidance = generate_kwargs.get("guidance_scale")
    if guidance is not None and guidance != 1:
        raise SteeringError("steering does not support classifier-free guidance (generate argument 'guidance_scale')")
    with SteeringProcessor(model, head) as steering:
        processors = LogitsProcessorList([steering, *(generate_kwargs.pop("logits_processor", None) or [])])
        output = model.generate(logits_processor=processors, **generate_kwargs)
        stats: SteeringStats = steering.stats
    return (output, stats) if return_stats else output
