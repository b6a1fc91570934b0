"""Branch continuations: from a prompt and a prefix of a completion (its last token switched, or nothing at all),
decode the rest and grade it. The engine behind the headroom analysis and the branch labels of training.

A branch is continued greedily, or sampled (a resample from the prompt, or one of several sampled continuations of
a switched prefix). A batch holds branches of one kind, of similar lengths; every branch stops at the completion's
token budget, prefix included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.pipeline.decoding import Decoder, DecodingSettings, ProcessorFactory, batches_by_length, decode_units
from steer.pipeline.folders import Record
from steer.pipeline.grading import grade
from steer.pipeline.jobs import Work

T = TypeVar("T")
R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Branch(Generic[T]):
    """One continuation to decode and grade.

    Attributes:
        key (`tuple`): the key of its record in the store it goes to.
        prompt_ids (`list[int]`), prefix (`list[int]`): what the model continues: the prompt, then completion tokens
            (the switched token last; empty for a resample from the prompt).
        gold (`str`): the gold answer the full completion is graded against.
        tag (`T`): what its record holds besides the outcome (a labelled point, a headroom switch, ...).
        sampled (`bool`, defaults to `False`): decoded with sampling ([`BranchDecoding`]'s temperature and top-p)
            rather than greedily (seeded from the keys of its batch, or from its own key by a
            [`Decoder`] such as vLLM's).
    """

    key: tuple
    prompt_ids: list[int]
    prefix: list[int]
    gold: str
    tag: T
    sampled: bool = False


@dataclass(frozen=True)
class Outcome:
    """A continued branch: the whole `completion` (text and `completion_ids`, prefix included, cut to the budget)
    and whether it is `correct`."""

    completion: str
    completion_ids: list[int]
    correct: bool


@dataclass(frozen=True)
class BranchDecoding:
    """How branches are decoded: the completion's token `budget` (prefix included); `temperature` and `top_p` for
    sampled branches (the others are greedy); `seed` for the batches' sampling."""

    budget: int
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0


def branch_batches(branches: Sequence[Branch], batch_size: int) -> list[list[Branch]]:
    """Batches of one kind (greedy, sampled) and similar lengths, longest first."""
    kinds = [[b for b in branches if b.sampled == sampled] for sampled in (False, True)]
    return [batch for kind in kinds if kind
            for batch in batches_by_length(kind, [len(b.prompt_ids) + len(b.prefix) for b in kind], batch_size)]


def continue_branches(model: PreTrainedModel | Decoder, tokenizer: PreTrainedTokenizerBase,
                      batch: Sequence[Branch[T]], decoding: BranchDecoding, record: Callable[[Branch[T], Outcome], R],
                      processor: ProcessorFactory | None = None) -> Work[R]:
    """Decode one batch (of one kind) with the model or an engine ([`Decoder`], such as vLLM's), through
    `processor` if given (a steering head, transformers only: branches continued by the steered model), grade each
    full completion, and make each branch's record from it and its [`Outcome`] with `record`."""
    budget = decoding.budget - min(len(b.prefix) for b in batch)
    settings = DecodingSettings(temperature=decoding.temperature if batch[0].sampled else 0.0, top_p=decoding.top_p,
                                max_new_tokens=max(1, budget))
    completions = decode_units(model, tokenizer, [b.prompt_ids + b.prefix for b in batch], settings, decoding.seed,
                               [b.key for b in batch], processor)
    records, tokens = [], 0
    for branch, completion in zip(batch, completions):
        ids = (branch.prefix + completion.token_ids)[: decoding.budget]
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        tokens += len(completion.token_ids)
        records.append(record(branch, Outcome(text, ids, grade(text, branch.gold))))
    return Work(records, len(batch), tokens)
