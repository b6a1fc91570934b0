"""Step 1 of the method: sample rollouts of the base model on training problems and grade them.

The store is `DIR/rollouts.jsonl`, one record per (problem, sample), appended and flushed as batches finish. Running
the same command again after an interruption (even `kill -9`) completes the store: nothing is lost and nothing is
written twice. `DIR/rollouts.settings.json` records how the store was made; resuming with other settings is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.decoding import (
    Completion,
    DecodingSettings,
    batches_by_length,
    decode_batch,
    derive_seed,
)
from steer.distributed import Workers, job_totals, merge_parts, open_store
from steer.grading import extract_answer, grade
from steer.problems import Problem
from steer.progress import ThroughputBar
from steer.prompts import DEFAULT_INSTRUCTION, build_prompt, encode_prompt
from steer.store import check_settings, read_jsonl

ROLLOUTS_FILE = "rollouts.jsonl"
SETTINGS_FILE = "rollouts.settings.json"
KEY = ("problem_id", "sample")

RewardFn = Callable[[str, Problem], float]


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled (defaults: the ReasonMaxxer recipe, 20 samples at temperature 0.6, top-p 0.95).

    Attributes:
        samples (`int`, defaults to 20): rollouts per problem.
        decoding ([`DecodingSettings`]): temperature, top-p and the length budget.
        batch_size (`int`, defaults to 16): sequences decoded together.
        seed (`int`, defaults to 0): base seed; each batch is seeded from it and the batch's contents.
        instruction (`str`): appended to each question (asks for the answer in `\\boxed{}`).
    """

    samples: int = 20
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    batch_size: int = 16
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class RolloutSummary:
    """What a rollout run did: `written` new records (of `total` in the store), their `tokens`, and the `seconds`
    it took; `mean_reward` is over the whole store."""

    path: Path
    written: int
    total: int
    tokens: int
    seconds: float
    mean_reward: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _graded_reward(completion: str, problem: Problem) -> float:
    return float(grade(completion, problem.gold))


def run_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    out_dir: str | os.PathLike,
    settings: RolloutSettings = RolloutSettings(),
    *,
    workers: Workers = Workers(),
    reward_fn: RewardFn = _graded_reward,
    progress: bool = True,
) -> RolloutSummary:
    """Sample `settings.samples` rollouts per problem, grade them, and append them to `out_dir/rollouts.jsonl`.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the base model (see [`load_model`]).
        problems (`Sequence[Problem]`): the training problems (see [`load_problems`]).
        out_dir (`str` or `os.PathLike`): the store's folder; an existing store is completed, not restarted.
        settings ([`RolloutSettings`]): sampling settings; they must match those of an existing store.
        workers ([`Workers`], *optional*): this process's share when several run the job (`accelerate launch`).
        reward_fn (`Callable[[str, Problem], float]`, *optional*): defaults to 1.0 when [`grade`] accepts the
            completion's answer, else 0.0.
        progress (`bool`, defaults to `True`): show a progress bar with tokens per second.

    Returns:
        [`RolloutSummary`].

    Example:

    ```python
    >>> summary = run_rollouts(model, tokenizer, load_problems("train.jsonl"), "runs/r1")  # doctest: +SKIP
    >>> summary.mean_reward  # doctest: +SKIP
    ```
    """
    out = Path(out_dir)
    path = out / ROLLOUTS_FILE
    if workers.is_main:
        check_settings(out / SETTINGS_FILE, {"model": model.name_or_path, **asdict(settings)})
    store, existing = open_store(path, KEY, workers)
    done = {store.key(record) for record in existing}
    texts = {p.id: build_prompt(tokenizer, p.question, settings.instruction) for p in problems}
    prompts = {problem_id: encode_prompt(tokenizer, text) for problem_id, text in texts.items()}
    pending = [(p, s) for p in problems for s in range(settings.samples) if (p.id, s) not in done]
    # Batches are formed from the whole work list and then shared, so that a batch (hence its seed and its
    # padding) is the same however many processes run.
    batches = list(batches_by_length(pending, [len(prompts[p.id]) for p, _ in pending], settings.batch_size))
    mine = workers.share(batches)
    bar = ThroughputBar(sum(map(len, mine)), "rollouts", "seq", progress and workers.is_main)
    for batch in mine:
        seed = derive_seed(settings.seed, *((p.id, s) for p, s in batch))
        completions = decode_batch(model, tokenizer, [prompts[p.id] for p, _ in batch], settings.decoding, seed)
        store.extend(
            [_record(p, s, texts[p.id], prompts[p.id], c, reward_fn) for (p, s), c in zip(batch, completions)]
        )
        bar.advance(len(completions), sum(c.steps for c in completions))
    bar.close()
    totals = job_totals(workers, bar)
    merge_parts(path, KEY, workers)
    records = list(read_jsonl(path, KEY)) if workers.is_main else []
    return RolloutSummary(
        path=path,
        written=totals["items"],
        total=len(records),
        tokens=totals["tokens"],
        seconds=totals["seconds"],
        mean_reward=sum(r["reward"] for r in records) / len(records) if records else 0.0,
    )


def _record(
    problem: Problem, sample: int, prompt: str, prompt_ids: list[int], completion: Completion, reward_fn: RewardFn
) -> dict:
    return {
        "problem_id": problem.id,
        "sample": sample,
        "benchmark": problem.benchmark,
        "gold": problem.gold,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "completion": completion.text,
        "completion_ids": completion.token_ids,
        "answer": extract_answer(completion.text),
        "reward": float(reward_fn(completion.text, problem)),
        "finish_reason": completion.finish_reason,
        "num_tokens": completion.steps,
    }
