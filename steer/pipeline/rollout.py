"""Step 1 of the method: sample rollouts of the base model on training problems and grade them.

The rollouts go to a rollouts folder (:mod:`steer.pipeline.folders.rollouts`), one record per (problem, sample),
appended and flushed as batches finish. Running the same command again after an interruption (even `kill -9`)
completes the store: nothing is lost and nothing is written twice; resuming with other settings is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.pipeline.decoding import Completion, Decoder, batches_by_length, decode_units, run_settings
from steer.pipeline.distributed import Workers
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutRecord
from steer.pipeline.grading import extract_answer, grade
from steer.pipeline.jobs import Job, Work, run_job
from steer.pipeline.problems import Problem
from steer.pipeline.progress import Throughput
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.settings import RolloutSettings

RewardFn = Callable[[str, Problem], float]


@dataclass(frozen=True)
class RolloutSummary(Throughput):
    """What a rollout run did: `written` new records (of `total` in the store), their `tokens`, and the `seconds`
    it took; `mean_reward` is over the whole store."""

    path: Path
    written: int
    total: int
    mean_reward: float


def _graded_reward(completion: str, problem: Problem) -> float:
    return float(grade(completion, problem.gold))


def run_rollouts(
    model: PreTrainedModel | Decoder,
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
        model (`PreTrainedModel` or [`Decoder`]): the base model (see [`load_model`]), or an engine that decodes
            with it (`steer.integrations.vllm.decoding.VllmDecoder`). tokenizer (`PreTrainedTokenizerBase`): its
            tokenizer.
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
    folder = RolloutFolder(out_dir)
    texts = {p.id: build_prompt(tokenizer, p.question, settings.instruction) for p in problems}
    prompts = {problem_id: encode_prompt(tokenizer, text) for problem_id, text in texts.items()}

    def work(batch: list[tuple[Problem, int]]) -> Work[RolloutRecord]:
        completions = decode_units(model, tokenizer, [prompts[p.id] for p, _ in batch], settings.decoding,
                                   settings.seed, [(p.id, s) for p, s in batch])
        records = [_record(p, s, texts[p.id], prompts[p.id], c, reward_fn) for (p, s), c in zip(batch, completions)]
        return Work(records, len(completions), sum(c.steps for c in completions))

    job = Job(
        label="rollouts", unit="seq", folder=folder, settings={**run_settings(model), **asdict(settings)},
        units=[(p, s) for p in problems for s in range(settings.samples)],
        unit_keys=lambda unit: [(unit[0].id, unit[1])],
        batches=lambda pending: batches_by_length(pending, [len(prompts[p.id]) for p, _ in pending],
                                                  settings.batch_size),
        work=work,
    )
    result = run_job(job, workers, progress)
    records = result.records
    return RolloutSummary(
        path=folder.records_path,
        written=result.totals.items,
        total=len(records),
        tokens=result.totals.tokens,
        seconds=result.totals.seconds,
        mean_reward=sum(r.reward for r in records) / len(records) if records else 0.0,
    )


def _record(
    problem: Problem, sample: int, prompt: str, prompt_ids: list[int], completion: Completion, reward_fn: RewardFn
) -> RolloutRecord:
    return RolloutRecord(
        problem_id=problem.id, sample=sample, benchmark=problem.benchmark, gold=problem.gold, prompt=prompt,
        prompt_ids=prompt_ids, completion=completion.text, completion_ids=completion.token_ids,
        answer=extract_answer(completion.text), reward=float(reward_fn(completion.text, problem)),
        finish_reason=completion.finish_reason, num_tokens=completion.steps,
    )
