"""The offline pipeline as commands: `steer rollout`, `steer score`, `steer train`."""

from __future__ import annotations

import click

from steer.cli.options import (
    cpu_option,
    data_options,
    dtype_option,
    emit,
    engine_option,
    json_option,
    model_dtype,
    model_option,
    out_option,
)
from steer.cli.settings import settings_from, settings_options
from steer.settings import DEFAULT_INSTRUCTION, LabelSettings, RolloutSettings, ScoreSettings, TrainSettings


@click.command()
@model_option
@data_options()
@out_option("Folder of the rollout store.")
@settings_options(RolloutSettings, help={"samples": "Rollouts per problem."})
@engine_option
@dtype_option
@cpu_option
@json_option
def rollout(model, data, out, question_field, answer_field, limit, engine, engine_args, cpu, dtype, as_json,
            **options):
    """Sample rollouts of the base model on benchmark problems and grade them into OUT/rollouts.jsonl.

    The store is appended to as batches finish; running the same command again after an interruption completes
    it. Under `accelerate launch -m steer rollout ...` (or `torchrun`) each process takes a share of the problems;
    with `--engine vllm` each process runs one engine on its own GPU (on a CPU, its share of the cores).
    """
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.problems import load_problems
    from steer.pipeline.rollout import run_rollouts

    workers = current_workers(cpu)
    settings = settings_from(RolloutSettings, options)
    problems = load_problems(data, question_field=question_field, answer_field=answer_field, limit=limit)
    lm, tokenizer, _ = decoding_models(engine, model, None, dtype, settings.seed, workers, engine_args)
    summary = run_rollouts(lm, tokenizer, problems, out, settings, workers=workers)
    if workers.is_main:
        emit(summary, as_json, [
            f"{summary.written} new rollouts ({summary.total} in {summary.path}), "
            f"mean reward {summary.mean_reward:.3f}",
            f"{summary.tokens} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)",
        ])


def decoding_models(engine: str, model: str, head: str | None, dtype: str, seed: int, workers,
                    engine_args: dict | None = None):
    """What a decoding command decodes with: `(base, tokenizer, steered)`, the steered one `None` without a head.
    With the hf engine, the loaded model (steered through a head's processor by the caller); with vLLM, decoders
    over one engine per process (steered when a head is given), built with `engine_args`."""
    if engine == "hf":
        if engine_args:
            raise click.UsageError("--engine-arg passes arguments to vLLM: use it with --engine vllm")
        from steer.models import load_model

        lm, tokenizer = load_model(model, device=workers.device, dtype=model_dtype(dtype))
        return lm, tokenizer, None
    from transformers import AutoTokenizer

    from steer.integrations.vllm.decoding import vllm_decoders

    tokenizer = AutoTokenizer.from_pretrained(model)
    base, steered = vllm_decoders(model, tokenizer, head, dtype, seed, workers, **(engine_args or {}))
    return base, tokenizer, steered


@click.command("import-rollouts")
@model_option
@click.option("--from", "source", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of rollouts sampled by another engine (fields: see `steer.pipeline.imports`).")
@out_option("Rollouts folder to write (records already there are kept).")
@click.option("--data", "-d", help="Benchmark holding the gold answers, for records with neither reward nor gold.")
@click.option("--instruction", default=DEFAULT_INSTRUCTION, show_default=True,
              help="Appended to `question` where a record gives a question instead of its prompt.")
@json_option
def import_rollouts_command(model, source, out, data, instruction, as_json):
    """Turn rollouts sampled elsewhere (vLLM, SGLang, ...) into a rollouts folder: prompts and completions are
    tokenised with MODEL's tokenizer and graded where no reward is given; then `steer score` and `steer train` run
    on OUT as on any rollouts folder."""
    from transformers import AutoTokenizer

    from steer.pipeline.folders.rollouts import RolloutFolder
    from steer.pipeline.imports import import_rollouts
    from steer.pipeline.problems import load_problems

    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = {p.id: p for p in load_problems(data)} if data else None
    total = import_rollouts(tokenizer, source, out, model_name=model, problems=problems, instruction=instruction)
    emit({"out": out, "total": total}, as_json, [f"{total} rollouts in {RolloutFolder(out).records_path}"])


@click.command()
@model_option
@click.option("--rollouts", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `steer rollout`.")
@settings_options(ScoreSettings, help={"top_k": "Candidates stored per position (at least the head's top-k)."})
@dtype_option
@cpu_option
@json_option
def score(model, rollouts, cpu, dtype, as_json, **options):
    """Teacher-force the base model over every rollout: per-token entropy, and decision-point features.

    Writes ROLLOUTS/scores; an interrupted run resumes. Under `accelerate launch` each process scores a share.
    """
    from steer.models import load_model
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.scoring import score_rollouts

    workers = current_workers(cpu)
    lm, _ = load_model(model, device=workers.device, dtype=model_dtype(dtype))
    settings = settings_from(ScoreSettings, options)
    summary = score_rollouts(lm, rollouts, settings, workers=workers)
    if workers.is_main:
        emit(summary, as_json, [
            f"scored {summary.scored} rollouts, {summary.tokens} tokens in {summary.seconds:.1f} s "
            f"({summary.tokens_per_second:.1f} tokens/s); {summary.points} positions stored above {settings.floor} "
            "nats",
            f"positions above tau = {settings.report_tau}: {summary.above_tau:.1%} -> {summary.scores_dir}",
        ])


@click.command()
@model_option
@click.option("--rollouts", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `steer rollout` and `steer score`.")
@settings_options(LabelSettings, help={"points": "Decision points labelled per rollout (which: --placement).",
                                       "top_k": "Candidates continued per point (at least the head's top-k).",
                                       "temperature": "Sampling temperature of --continuations above 1 (one "
                                                      "continuation is greedy)."})
@engine_option
@dtype_option
@cpu_option
@json_option
def label(model, rollouts, engine, engine_args, cpu, dtype, as_json, **options):
    """Label decision points by branching: continue each top-k candidate (greedily, or --continuations N times
    sampled) and grade it, so that `steer train --labels branches` learns each candidate's own success. Writes
    ROLLOUTS/labels; resumes; shares the branches among processes under `accelerate launch` or `torchrun`."""
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.labels import label_branches

    workers = current_workers(cpu)
    lm, tokenizer, _ = decoding_models(engine, model, None, dtype, options.get("seed", 0), workers, engine_args)
    summary = label_branches(lm, tokenizer, rollouts, settings_from(LabelSettings, options), workers=workers)
    if workers.is_main:
        emit(summary, as_json, [
            f"{summary.branches} branches this run, {summary.points} labelled points above tau = {summary.tau:.3f} "
            f"nats -> {summary.path}",
            f"{summary.tokens} tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)",
        ])


@click.command()
@model_option
@click.option("--rollouts", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `steer rollout` and `steer score`.")
@out_option("Folder for the trained head.")
@settings_options(TrainSettings, help={"top_k": "Candidates the head re-scores at a decision point."})
@cpu_option
@json_option
def train(model, rollouts, out, cpu, as_json, **options):
    """Train a correction head on the scored rollouts (no model forward passes) and save it to OUT."""
    from steer.models import load_model
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.training import train_head

    lm, _ = load_model(model, device=current_workers(cpu).device)
    settings = settings_from(TrainSettings, options)
    result = train_head(lm, rollouts, settings)
    result.save(out)
    record = result.record
    pool = record.pool
    for warning in record.warnings:
        click.echo(f"warning: {warning}", err=True)
    emit(record, as_json, [
        f"pool: {pool.problems} problems, {pool.rollouts} rollouts; tau = {record.tau:.3f} nats "
        f"({pool.train_points} training and {pool.heldout_points} held-out decision points)",
        f"selected step {record.selected_step} of {settings.steps} and strength x{record.scale:g} by held-out gain "
        f"(null margin {settings.null_margin:g}, then the one-standard-error rule); {record.seconds:.1f} s -> {out}",
    ], head=out)
