"""Step 2 of the method: one teacher-forced pass of the base model over every rollout.

For each generated position it records the entropy of the base distribution (float32, nats, full vocabulary), and
at positions whose entropy exceeds a storage floor (set below any tau you will try) the features head training
needs: the top-k candidate ids and log-probabilities, the sampled token and its log-probability, and the final
hidden state (float16). So decision points can be re-gated at any tau above the floor without running the model again.

The tensors go to the rollouts folder's `scores/` folder (:mod:`steer.pipeline.folders.scores`); an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from steer.functional import entropy_topk
from steer.head import embedding_fingerprint, output_embedding
from steer.pipeline.distributed import Workers
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutRecord, TokenSequence, sequence_length
from steer.pipeline.folders.scores import ShardRecord
from steer.pipeline.jobs import Job, Work, run_job
from steer.pipeline.progress import Throughput
from steer.settings import ScoreSettings


@dataclass(frozen=True)
class ScoreSummary(Throughput):
    """What a scoring run did: `scored` rollouts and their `tokens` this run, `points` stored, in `seconds`;
    `above_tau` is the share of all scored positions (the whole index) whose entropy exceeded `report_tau`."""

    scores_dir: Path
    scored: int
    points: int
    above_tau: float


@contextmanager
def lm_head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Collect the inputs of the model's output embedding (the final hidden states) during the `with` block."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def score_rollouts(
    model: PreTrainedModel,
    rollouts_dir: str | os.PathLike,
    settings: ScoreSettings = ScoreSettings(),
    *,
    workers: Workers = Workers(),
    progress: bool = True,
) -> ScoreSummary:
    """Score every rollout of `rollouts_dir/rollouts.jsonl` not scored yet, writing shards to `rollouts_dir/scores`.

    Args:
        model (`PreTrainedModel`): the base model the rollouts came from.
        rollouts_dir (`str` or `os.PathLike`): a folder written by [`run_rollouts`].
        settings ([`ScoreSettings`]): storage floor, candidates kept, batch size.
        workers ([`Workers`], *optional*): this process's share when several run the job (`accelerate launch`).
        progress (`bool`, defaults to `True`): show a progress bar with tokens per second.

    Returns:
        [`ScoreSummary`].
    """
    folder = RolloutFolder(rollouts_dir)
    scores = folder.scores
    rollouts = folder.read_records()
    if any(not r.prompt_ids for r in rollouts):
        raise ValueError(f"{folder.records_path}: a rollout has an empty prompt (no logits predict its start)")
    if workers.is_main:
        scores.path.mkdir(parents=True, exist_ok=True)
        scores.write_fingerprint(embedding_fingerprint(output_embedding(model)))

    def work(group: list[RolloutRecord]) -> Work[ShardRecord]:
        shard = _score_group(model, group, settings)
        record = scores.write_shard(workers.rank, [r.key for r in group], shard, settings.report_tau)
        return Work([record], len(group), shard["entropy"].numel(), {"points": shard["point_token"].numel()})

    job = Job(
        label="scoring", unit="rollout", folder=scores, settings=score_settings_record(model, settings),
        units=rollouts, unit_keys=lambda rollout: [rollout.key],
        covered_keys=lambda shard: [r.key for r in shard.rollouts],
        batches=lambda pending: _chunks(sorted(pending, key=sequence_length), settings.shard_rollouts),
        work=work, count_names=("points",),
    )
    result = run_job(job, workers, progress)
    stats = [rollout for shard in result.records for rollout in shard.rollouts]
    total = sum(r.num_tokens for r in stats)
    return ScoreSummary(
        scores_dir=scores.path,
        scored=result.totals.items,
        tokens=result.totals.tokens,
        points=result.totals.counts["points"],
        seconds=result.totals.seconds,
        above_tau=sum(r.above_tau * r.num_tokens for r in stats) / total if total else 0.0,
    )


def score_settings_record(model: PreTrainedModel, settings: ScoreSettings) -> dict:
    """The settings a scores folder is bound to (the batch size and shard size do not change the results)."""
    return {
        "model": model.name_or_path,
        "floor": settings.floor,
        "top_k": settings.top_k,
        "report_tau": settings.report_tau,
    }


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def token_batches(group: Sequence[TokenSequence], max_tokens: int) -> Iterator[list[int]]:
    """Indices into `group` (sequences sorted by increasing length) for forward passes of at most `max_tokens`
    padded tokens (a sequence longer than that gets a pass of its own)."""
    batch: list[int] = []
    for index in range(len(group)):
        if batch and (len(batch) + 1) * sequence_length(group[index]) > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def _score_group(model: PreTrainedModel, group: list[RolloutRecord],
                 settings: ScoreSettings) -> dict[str, torch.Tensor]:
    """The tensors of one shard (see [`SHARD_TENSORS`]) for `group`."""
    entropies: list[torch.Tensor | None] = [None] * len(group)
    parts: list[dict[str, torch.Tensor]] = []
    for batch in token_batches(group, settings.max_batch_tokens):
        for index, scored in zip(batch, _score_batch(model, [group[i] for i in batch], settings)):
            entropies[index] = scored.pop("entropy")
            scored["point_rollout"] = torch.full_like(scored["point_token"], index)
            parts.append(scored)
    lengths = torch.tensor([0] + [e.numel() for e in entropies])
    shard = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return {"entropy": torch.cat(entropies), "offsets": lengths.cumsum(0), **shard}


def _score_batch(model: PreTrainedModel, rollouts: list[RolloutRecord], settings: ScoreSettings) -> list[dict]:
    """Teacher-force one batch; per rollout, its entropies and the features of its stored points."""
    return [
        _features(logits, hidden, torch.tensor(rollout.completion_ids, device=logits.device), settings)
        for rollout, (logits, hidden) in zip(rollouts, teacher_force(model, rollouts))
    ]


def teacher_force(model: PreTrainedModel,
                  rollouts: Sequence[TokenSequence]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass of `model` over the prompt and completion of each rollout, right-padded together.

    Args:
        model (`PreTrainedModel`): any causal LM.
        rollouts (`Sequence[TokenSequence]`): rollout records, or anything with `prompt_ids` (not empty) and
            `completion_ids`.

    Returns:
        Per rollout, `(logits, hidden)`: the logits `[completion tokens, vocab]` in the model's dtype that predicted
        each completion token, and the final hidden states `[completion tokens, hidden_size]` they came from.
    """
    sequences = [[*r.prompt_ids, *r.completion_ids] for r in rollouts]
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    with torch.inference_mode(), lm_head_inputs(model) as hidden_states:
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    hidden = hidden_states[-1]
    results = []
    for row, rollout in enumerate(rollouts):
        start = len(rollout.prompt_ids) - 1  # logits at position t predict token t + 1
        positions = slice(start, start + len(rollout.completion_ids))
        results.append((logits[row, positions], hidden[row, positions]))
    return results


def _features(
    logits: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, settings: ScoreSettings
) -> dict[str, torch.Tensor]:
    k = min(settings.top_k, logits.shape[-1])
    entropy, values, indices = entropy_topk(logits, k)
    lse = torch.logsumexp(logits.float(), dim=-1)
    token_logprob = logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    keep = entropy > settings.floor
    return {
        "entropy": entropy.cpu(),
        "point_position": keep.nonzero().squeeze(-1).cpu(),
        "point_entropy": entropy[keep].cpu(),
        "point_topk_ids": indices[keep].cpu(),
        "point_topk_logprobs": (values - lse.unsqueeze(-1))[keep].cpu(),
        "point_token": targets[keep].cpu(),
        "point_token_logprob": token_logprob[keep].cpu(),
        "point_hidden": hidden[keep].to(torch.float16).cpu(),
    }
