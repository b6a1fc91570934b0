"""`steer analyze`: check the paper's claims on a pair of models, a base model and its RL-trained version."""

from __future__ import annotations

from pathlib import Path

import click

from steer.cli.evaluate import benchmarks_option, load_benchmarks
from steer.cli.options import (
    cpu_option,
    data_options,
    decoding_options,
    emit,
    json_option,
    reports_errors,
)
from steer.decoding import DecodingSettings
from steer.distributed import Workers, current_workers
from steer.evaluation import EvalSettings
from steer.footprint import REPORT_FILE as FOOTPRINT_FILE
from steer.footprint import FootprintSettings, footprint
from steer.intervention import REPORT_FILE as INTERVENTION_FILE
from steer.intervention import intervene
from steer.models import load_model
from steer.problems import load_problems
from steer.rollout import RolloutSettings


def pair_options(command):
    """--base and --rl: the two models compared, which must share a tokenizer."""
    command = click.option("--rl", required=True, help="The RL-trained model (folder or Hub id).")(command)
    return click.option("--base", required=True, help="The base model (folder or Hub id).")(command)


def load_pair(base: str, rl: str, workers: Workers):
    base_model, tokenizer = load_model(base, device=workers.device)
    rl_model, rl_tokenizer = load_model(rl, device=workers.device)
    if rl_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise click.ClickException(f"{base} and {rl} have different vocabularies: they must share a tokenizer")
    return base_model, rl_model, tokenizer


def footprint_lines(report: dict, out: str) -> list[str]:
    entropy, shares = report["entropy"], report["rank_share"]
    gates = [g for g in report["gate"] if g["tau"] in (0.5, 1.0, 1.4, 2.0)]
    ratio = f"{entropy['ratio']:.2f}x" if entropy["ratio"] is not None else "-"
    differing = "-" if entropy["mean_differing"] is None else f"{entropy['mean_differing']:.3f} nats"
    lines = [
        f"{report['positions']} positions of {report['rollouts']} RL completions (RL accuracy "
        f"{report['rl_accuracy']:.3f}): top-1 differs at {report['differ_fraction']:.2%}",
        "RL choice inside the base top-1 / top-5 / top-10: "
        + " / ".join(f"{shares[k]:.2%}" for k in ("1", "5", "10")),
        f"base entropy where they differ {differing}, overall {entropy['mean_all']:.3f} nats ({ratio})",
    ]
    for gate in gates:
        precision = "-" if gate["precision"] is None else f"{gate['precision']:.3f}"
        recall = "-" if gate["recall"] is None else f"{gate['recall']:.3f}"
        lines.append(f"  entropy > {gate['tau']}: gates {gate['gated_fraction']:.2%} of positions, "
                     f"precision {precision}, recall {recall}")
    return [*lines, f"-> {Path(out) / FOOTPRINT_FILE}", *(f"-> {plot}" for plot in report["plots"])]


def intervention_lines(report: dict, out: str) -> list[str]:
    lines = []
    for name, arms in report["benchmarks"].items():
        for arm, row in arms.items():
            share = row.get("recovered")
            recovered = f", recovers {share:.1%} of the RL gain" if share is not None else ""
            acted = f", substituted at {row['substituted']:.2%} of steps" if arm in ("gated", "random") else ""
            lines.append(f"{name} {arm:>6}: accuracy {row['accuracy']:.3f}{acted}{recovered}")
    return [*lines, f"-> {Path(out) / INTERVENTION_FILE}"]


@click.group()
def analyze() -> None:
    """Compare a base model with its RL-trained version: where RL changed choices, and whether they matter."""


@analyze.command("footprint")
@pair_options
@click.option("--data", "-d", required=True, help="Benchmark file (JSONL, JSON, parquet) or dataset name.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the analysis.")
@decoding_options(samples=4, max_new_tokens=1024, samples_help="RL completions per problem.")
@click.option("--max-batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Padded tokens per teacher-forced pass.")
@data_options
@cpu_option
@json_option
@reports_errors
def footprint_command(base, rl, data, out, samples, temperature, top_p, max_new_tokens, batch_size, seed,
                      instruction, max_batch_tokens, question_field, answer_field, limit, cpu, as_json):
    """Sample completions from the RL model and compare both models at every position of them.

    Reports how often the top-1 differs, the rank of the RL choice in the base distribution, the base entropy
    where they differ, and the precision and recall of the gate "entropy > tau"; writes OUT/footprint.json and,
    with matplotlib (`pip install steer[analysis]`), entropy and rank histograms. Sampling resumes in OUT.
    """
    launched = current_workers(cpu)
    if launched.world > 1:
        raise click.UsageError("footprint runs in one process; launch it without accelerate or torchrun")
    workers = Workers(device=launched.device)
    problems = load_problems(data, question_field=question_field, answer_field=answer_field, limit=limit)
    base_model, rl_model, tokenizer = load_pair(base, rl, workers)
    settings = FootprintSettings(
        rollouts=RolloutSettings(
            samples=samples, batch_size=batch_size, seed=seed, instruction=instruction,
            decoding=DecodingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
        ),
        max_batch_tokens=max_batch_tokens,
    )
    report = footprint(base_model, rl_model, tokenizer, problems, out, settings)
    emit({"out": out, **report}, as_json, footprint_lines(report, out))


@analyze.command("intervene")
@pair_options
@benchmarks_option
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder for the analysis.")
@click.option("--tau", default=1.4, show_default=True, type=float, help="Entropy gate in nats.")
@decoding_options(samples=1, max_new_tokens=4096, samples_help="Decodes per problem and arm.")
@data_options
@cpu_option
@json_option
@reports_errors
def intervene_command(base, rl, sources, out, tau, samples, temperature, top_p, max_new_tokens, batch_size, seed,
                      instruction, question_field, answer_field, limit, cpu, as_json):
    """Decode with the base model, substituting the RL model's top-1 where the base entropy exceeds TAU, and at as
    many random steps; compare with both models alone.

    Reports each arm's accuracy and the share of the RL gain the substitutions recover; writes OUT/arms,
    OUT/random and OUT/intervention.json. Resumes in OUT; shares work under `accelerate launch` or `torchrun`.
    """
    workers = current_workers(cpu)
    benchmarks = load_benchmarks(sources, question_field, answer_field, limit)
    base_model, rl_model, tokenizer = load_pair(base, rl, workers)
    settings = EvalSettings(
        samples=samples, batch_size=batch_size, seed=seed, instruction=instruction,
        decoding=DecodingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
    )
    report = intervene(base_model, rl_model, tokenizer, benchmarks, out, settings, tau=tau, workers=workers)
    if workers.is_main:
        emit({"out": out, **report}, as_json, intervention_lines(report, out))
