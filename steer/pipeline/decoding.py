"""Batched decoding of prompts, plain or steered, with per-sequence results: the engine behind rollouts and eval.

Decoding runs on transformers' `generate` ([`decode_batch`]), or on another engine that implements [`Decoder`]
(vLLM: `steer.integrations.vllm.decoding.VllmDecoder`); [`decode_units`] picks the one a stage was given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from steer.head import CorrectionHead
from steer.processor import SteeringProcessor
from steer.settings import DecodingSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Completion:
    """One decoded sequence.

    Attributes:
        text (`str`): the generated text, special tokens removed.
        token_ids (`list[int]`): the generated tokens, up to and including the end-of-sequence token if one came.
        finish_reason (`str`): `"stop"` (an end-of-sequence token) or `"length"` (`max_new_tokens` reached).
        gated (`int`), changed (`int`): steps of this sequence where the processor acted (the head's decision
            points, or substitutions), and those where that changed the top-1 token (0 without a processor).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    gated: int = 0
    changed: int = 0

    @property
    def steps(self) -> int:
        return len(self.token_ids)


class RecordingProcessor(Protocol):
    """A logits processor that intervenes at some steps and records where: what [`decode_batch`] runs.

    `row_masks()` returns `(gated, changed)`, `torch.BoolTensor`s of shape `(rows, steps)`: the steps where it
    intervened (its gate opened), and those where that changed the top-1 token; `close()` releases what it holds
    (hooks, caches).
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor: ...

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


ProcessorFactory = Callable[[dict[str, torch.Tensor]], RecordingProcessor]
"""Builds the processor for one batch from the batch's tensors (`input_ids`, `attention_mask`, left-padded)."""


@runtime_checkable
class Decoder(Protocol):
    """A decoding engine other than transformers' `generate`, which stages take in place of a model.

    Attributes:
        name_or_path (`str`): the model it decodes with, as recorded in a run's settings.
    """

    name_or_path: str

    def decode(self, prompt_ids: Sequence[Sequence[int]], settings: DecodingSettings,
               seeds: Sequence[int]) -> list[Completion]:
        """Decode each prompt with its own seed (so a sample is the same whatever batch it is in)."""
        ...

    def run_settings(self) -> dict[str, Any]:
        """What it adds to a run's settings, so that a run cannot resume with another engine."""
        ...


def decode_units(model: PreTrainedModel | Decoder, tokenizer: PreTrainedTokenizerBase,
                 prompt_ids: Sequence[Sequence[int]], settings: DecodingSettings, seed: int, keys: Sequence[tuple],
                 processor: ProcessorFactory | None = None) -> list[Completion]:
    """Decode one batch of units, each prompt named by its key (problem and sample): with transformers as one batch
    seeded from `seed` and all the keys (see [`decode_batch`]); with a [`Decoder`], each with a seed from `seed` and
    its own key."""
    if isinstance(model, Decoder):
        if processor is not None:
            raise ValueError("a logits processor runs in transformers' generate only: decode with the model")
        return model.decode(prompt_ids, settings, [derive_seed(seed, key) for key in keys])
    return decode_batch(model, tokenizer, prompt_ids, settings, derive_seed(seed, *keys), processor)


def run_settings(model: PreTrainedModel | Decoder) -> dict[str, Any]:
    """The model's name, and what its engine adds, for a run's settings."""
    return {"model": model.name_or_path, **(model.run_settings() if isinstance(model, Decoder) else {})}


def steering(model: PreTrainedModel, head: CorrectionHead) -> ProcessorFactory:
    """The factory of [`SteeringProcessor`]s for `model` and `head`, recording per-row masks. They steer in place:
    [`decode_batch`] keeps only the generated tokens, never the scores."""
    return lambda batch: SteeringProcessor(model, head, record_rows=True, inplace=True)


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on `seed` and `keys`, so a batch is sampled the same however work is split."""
    digest = hashlib.sha256(repr((seed, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batches_by_length(items: Sequence[T], lengths: Sequence[int], batch_size: int) -> Iterator[list[T]]:
    """Split `items` into batches of at most `batch_size`, longest first, so that each batch holds prompts of
    similar length (little padding) and the largest batches come first (an out-of-memory error comes early)."""
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start : start + batch_size]]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def decode_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    settings: DecodingSettings,
    seed: int,
    processor: ProcessorFactory | None = None,
) -> list[Completion]:
    """Decode one batch of tokenised prompts (left-padded together), through a processor if given (for example
    [`steering`] with a head).

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the model and its tokenizer.
        prompt_ids (`Sequence[Sequence[int]]`): one list of token ids per prompt.
        settings ([`DecodingSettings`]): sampling or greedy, and the length budget.
        seed (`int`): seeds torch's generator before the processor is built and decoding starts, so the same batch
            decodes the same way twice (the base and steered arms of an evaluation share their random draws); a
            processor must not draw from torch's generator (it may read `torch.initial_seed()`).
        processor ([`ProcessorFactory`], *optional*): builds the batch's [`RecordingProcessor`]; the completions
            count the steps where it acted (`gated`) and changed the top-1 (`changed`).

    Returns:
        `list[Completion]`, in the order of `prompt_ids`.
    """
    batch = tokenizer.pad({"input_ids": [list(ids) for ids in prompt_ids]}, padding=True, return_tensors="pt")
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
    kwargs = {**batch, **settings.generate_kwargs(), "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    intervention = processor(batch) if processor is not None else None
    try:
        if intervention is not None:
            kwargs["logits_processor"] = LogitsProcessorList([intervention])
        with torch.inference_mode():
            output = model.generate(**kwargs)
        gated, changed = intervention.row_masks() if intervention is not None else (None, None)
    finally:
        if intervention is not None:
            intervention.close()
    generated = output[:, batch["input_ids"].shape[1] :].tolist()
    stop_ids = _stop_ids(model, tokenizer)
    return [
        _completion(tokenizer, row, stop_ids, gated, changed, index)
        for index, row in enumerate(generated)
    ]


def _completion(
    tokenizer: PreTrainedTokenizerBase,
    row: list[int],
    stop_ids: set[int],
    gated: torch.Tensor | None,
    changed: torch.Tensor | None,
    index: int,
) -> Completion:
    stop = next((position for position, token in enumerate(row) if token in stop_ids), None)
    token_ids = row if stop is None else row[: stop + 1]
    finish_reason = "stop" if stop is not None else "length"
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if gated is None:
        return Completion(text, token_ids, finish_reason)
    steps = len(token_ids)
    return Completion(
        text, token_ids, finish_reason, int(gated[index, :steps].sum()), int(changed[index, :steps].sum())
    )

