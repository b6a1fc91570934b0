"""The offline pipeline as commands: `steer rollout`, `steer score`, `steer train`."""

from __future__ import annotations

import click

from steer.cli.options import (
    cpu_option,
    data_options,
    decoding_options,
    emit,
    json_option,
    model_option,
    reports_errors,
)
from steer.decoding import DecodingSettings
from steer.distributed import current_workers
from steer.head import check_scale
from steer.models import load_model
from steer.problems import load_problems
from steer.rollout import RolloutSettings, run_rollouts
from steer.scoring import ScoreSettings, score_rollouts
from steer.training import OBJECTIVES, TrainSettings, train_head


@click.command()
@model_option
@click.option("--data", "-d", required=True, help="Benchmark file (JSONL, JSON, parquet) or dataset name.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder of the rollout store.")
@decoding_options(samples=20, max_new_tokens=8192, samples_help="Rollouts per problem.")
@data_options
@cpu_option
@json_option
@reports_errors
def rollout(model, data, out, samples, temperature, top_p, max_new_tokens, batch_size, seed, instruction,
            question_field, answer_field, limit, cpu, as_json):
    """Sample rollouts of the base model on benchmark problems and grade them into OUT/rollouts.jsonl.

    The store is appended to as batches finish; running the same command again after an interruption completes
    it. Under `accelerate launch -m steer rollout ...` each process takes a share of the problems.
    """
    workers = current_workers(cpu)
    problems = load_problems(data, question_field=question_field, answer_field=answer_field, limit=limit)
    lm, tokenizer = load_model(model, device=workers.device)
    settings = RolloutSettings(
        samples=samples,
        decoding=DecodingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
        batch_size=batch_size,
        seed=seed,
        instruction=instruction,
    )
    summary = run_rollouts(lm, tokenizer, problems, out, settings, workers=workers)
    if workers.is_main:
        emit(summary, as_json, [
            f"{summary.written} new rollouts ({summary.total} in {summary.path}), "
            f"mean reward {summary.mean_reward:.3f}",
            f"{summary.tokens} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)",
        ])


@click.command()
@model_option
@click.option("--rollouts", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `steer rollout`.")
@click.option("--floor", default=0.5, show_default=True, type=float,
              help="Store features where the entropy exceeds this (nats); keep it below any tau you will try.")
@click.option("--top-k", default=16, show_default=True, type=click.IntRange(1, 64), help="Candidates stored.")
@click.option("--max-batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Padded tokens per forward pass.")
@cpu_option
@json_option
@reports_errors
def score(model, rollouts, floor, top_k, max_batch_tokens, cpu, as_json):
    """Teacher-force the base model over every rollout: per-token entropy, and decision-point features.

    Writes ROLLOUTS/scores; an interrupted run resumes. Under `accelerate launch` each process scores a share.
    """
    workers = current_workers(cpu)
    lm, _ = load_model(model, device=workers.device)
    settings = ScoreSettings(floor=floor, top_k=top_k, max_batch_tokens=max_batch_tokens)
    summary = score_rollouts(lm, rollouts, settings, workers=workers)
    if workers.is_main:
        emit(summary, as_json, [
            f"scored {summary.scored} rollouts, {summary.tokens} tokens in {summary.seconds:.1f} s "
            f"({summary.tokens_per_second:.1f} tokens/s); {summary.points} positions stored above {floor} nats",
            f"positions above tau = {settings.report_tau}: {summary.above_tau:.1%} -> {summary.scores_dir}",
        ])


def parse_scales(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    """`"0.5,1,2"` -> `(0.5, 1.0, 2.0)`, or a usage error showing the bad value."""
    try:
        return tuple(check_scale(float(part)) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, each finite and >= 0; got {value!r}") from None


@click.command()
@model_option
@click.option("--rollouts", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `steer rollout` and `steer score`.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the trained head.")
@click.option("--tau", default=1.4, show_default=True, type=float, help="Decision threshold in nats.")
@click.option("--tau-quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Set tau as this quantile of the base entropy instead (0.95 gates the top 5%).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--pool-problems", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--keep-shortest", default=0.8, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--kl-weight", default=0.2, show_default=True, type=click.FloatRange(min=0))
@click.option("--objective", default="unlikelihood", show_default=True, type=click.Choice(OBJECTIVES),
              help="How worse-than-average choices are pushed down: bounded (unlikelihood) or the paper's loss.")
@click.option("--lr", default=3e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--steps", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--scales", default="0.5,1,2,4,8", show_default=True, callback=parse_scales,
              help="Correction strengths tried after training; the best on held-out points is kept.")
@click.option("--seed", default=0, show_default=True, type=int)
@cpu_option
@json_option
@reports_errors
def train(model, rollouts, out, tau, tau_quantile, top_k, rank, pool_problems, keep_shortest, kl_weight, objective, lr,
          steps, scales, seed, cpu, as_json):
    """Train a correction head on the scored rollouts (no model forward passes) and save it to OUT."""
    lm, _ = load_model(model, device=current_workers(cpu).device)
    settings = TrainSettings(
        tau=tau, tau_quantile=tau_quantile, top_k=top_k, rank=rank, pool_problems=pool_problems,
        keep_shortest=keep_shortest, kl_weight=kl_weight, objective=objective, lr=lr, steps=steps, scales=scales,
        seed=seed,
    )
    result = train_head(lm, rollouts, settings)
    result.save(out)
    record = result.record
    pool = record["pool"]
    emit({"head": out, **record}, as_json, [
        f"pool: {pool['problems']} problems, {pool['rollouts']} rollouts; tau = {record['tau']:.3f} nats "
        f"({pool['train_points']} training and {pool['heldout_points']} held-out decision points)",
        f"selected step {record['selected_step']} of {steps} and strength x{record['scale']:g} by held-out gain; "
        f"{record['seconds']:.1f} s -> {out}",
    ])
