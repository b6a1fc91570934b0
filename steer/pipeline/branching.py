"""Branch continuations: from a prompt and a prefix of a completion (its last token switched, or nothing at all),
decode the rest and grade it. The engine behind the headroom analysis and the branch labels of training.

A branch is continued greedily, or sampled when it has no prefix (a resample from the prompt). A batch holds
branches of one kind, of similar lengths; every branch stops at the completion's token budget, prefix included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.pipeline.decoding import Decoder, DecodingSettings, ProcessorFactory, batches_by_length, decode_units
from steer.pipeline.grading import grade
from steer.pipeline.jobs import Work


@dataclass(frozen=True)
class Branch:
    """One continuation to decode and grade.

    Attributes:
        key (`dict[str, Any]`): the fields that identify its record (the store's key fields and their values).
        prompt_ids (`list[int]`), prefix (`list[int]`): what the model continues: the prompt, then completion tokens
            (the switched token last); an empty prefix is a resample, decoded with sampling.
        gold (`str`): the gold answer the full completion is graded against.
        info (`dict[str, Any]`): other fields copied into its record (position, entropy, ...).
    """

    key: dict[str, Any]
    prompt_ids: list[int]
    prefix: list[int]
    gold: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return not self.prefix

    def unit_key(self) -> tuple:
        return tuple(self.key.values())


@dataclass(frozen=True)
class BranchDecoding:
    """How branches are decoded: the completion's token `budget` (prefix included); `temperature` and `top_p` for
    resamples (switched branches are greedy); `seed` for the batches' sampling."""

    budget: int
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0


def branch_batches(branches: Sequence[Branch], batch_size: int) -> list[list[Branch]]:
    """Batches of one kind (greedy switches, sampled resamples) and similar lengths, longest first."""
    kinds = [[b for b in branches if b.sampled == sampled] for sampled in (False, True)]
    return [batch for kind in kinds if kind
            for batch in batches_by_length(kind, [len(b.prompt_ids) + len(b.prefix) for b in kind], batch_size)]


def continue_branches(model: PreTrainedModel | Decoder, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Branch],
                      decoding: BranchDecoding, processor: ProcessorFactory | None = None) -> Work:
    """Decode one batch (of one kind) with the model or an engine ([`Decoder`], such as vLLM's), through
    `processor` if given (a steering head, transformers only: branches continued by the steered model), and grade
    each full completion; a record per branch: its key fields, its info, the completion text and token ids (prefix
    included, cut to the budget) and whether it is `correct`."""
    budget = decoding.budget - min(len(b.prefix) for b in batch)
    settings = DecodingSettings(temperature=decoding.temperature if batch[0].sampled else 0.0, top_p=decoding.top_p,
                                max_new_tokens=max(1, budget))
    completions = decode_units(model, tokenizer, [b.prompt_ids + b.prefix for b in batch], settings, decoding.seed,
                               [b.unit_key() for b in batch], processor)
    records, tokens = [], 0
    for branch, completion in zip(batch, completions):
        ids = (branch.prefix + completion.token_ids)[: decoding.budget]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        tokens += len(completion.token_ids)
        records.append({**branch.key, **branch.info, "completion": text, "completion_ids": ids,
                        "correct": grade(text, branch.gold)})
    return Work(records, len(batch), tokens)
