"""Loading a causal LM and its tokenizer by name or path, ready for batched decoding and scoring."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from steer.errors import SteerError


class ModelLoadError(SteerError, RuntimeError):
    """The model or tokenizer could not be loaded; the message says what to check."""


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it, else float32 (CPU matmuls in half precision are slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode and its tokenizer, set up for left-padded batches.

    Args:
        name_or_path (`str` or `os.PathLike`): a local model folder, or a Hub model id (needs the Hub).
        device (`str` or `torch.device`, *optional*): defaults to CUDA when available, else CPU.
        dtype (`torch.dtype`, *optional*): defaults to [`default_dtype`] for the device.

    Returns:
        `(model, tokenizer)`; the tokenizer pads on the left and has a pad token (the EOS token if it had none).

    Example:

    ```python
    >>> model, tokenizer = load_model("benches/models/SmolLM2-135M-Instruct")  # doctest: +SKIP
    ```
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    source = str(name_or_path)
    local = os.path.exists(source)
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ModelLoadError(f"{source}: no such model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    except OSError as err:
        hint = "" if local else " (not a local folder, and the Hub is unreachable or HF_HUB_OFFLINE is set)"
        raise ModelLoadError(f"could not load model {source!r}{hint}: {err}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
