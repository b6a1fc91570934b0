"""`steer analyze`: check the paper's claims on a pair of models, a base model and its RL-trained version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from steer.cli.evaluate import load_benchmarks
from steer.cli.options import (
    cpu_option,
    data_options,
    dtype_option,
    emit,
    json_option,
    model_dtype,
    model_option,
    out_option,
)
from steer.cli.settings import settings_from, settings_options
from steer.settings import PAPER_TAU, EvalSettings, FootprintSettings, HeadroomSettings

if TYPE_CHECKING:
    from steer.analysis.footprint import FootprintResult, RolloutSpread
    from steer.analysis.headroom import HeadroomReport
    from steer.analysis.intervention import InterventionReport
    from steer.pipeline.distributed import Workers


def pair_options(command):
    """--base and --rl: the two models compared, which must share a tokenizer."""
    command = click.option("--rl", required=True, help="The RL-trained model (folder or Hub id).")(command)
    return click.option("--base", required=True, help="The base model (folder or Hub id).")(command)


def load_pair(base: str, rl: str, workers: Workers):
    from steer.models import load_model

    base_model, tokenizer = load_model(base, device=workers.device)
    rl_model, rl_tokenizer = load_model(rl, device=workers.device)
    if rl_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise click.ClickException(f"{base} and {rl} have different vocabularies: they must share a tokenizer")
    return base_model, rl_model, tokenizer


def footprint_lines(result: FootprintResult, out: str) -> list[str]:
    from steer.analysis.footprint import REPORT_FILE

    report = result.report
    entropy, shares = report.entropy, report.rank_share
    gates = [g for g in report.gate if g.tau in (0.5, 1.0, 1.4, 2.0)]
    ratio = f"{entropy.ratio:.2f}x" if entropy.ratio is not None else "-"
    differing = "-" if entropy.mean_differing is None else f"{entropy.mean_differing:.3f} nats"
    lines = [
        f"{report.positions} positions of {result.rollouts} RL completions (RL accuracy "
        f"{result.rl_accuracy:.3f}): top-1 differs at {report.differ_fraction:.2%}",
        "RL choice inside the base top-1 / top-5 / top-10: " + " / ".join(f"{shares[k]:.2%}" for k in ("1", "5", "10")),
        f"base entropy where they differ {differing}, overall {entropy.mean_all:.3f} nats ({ratio})",
    ]
    for gate in gates:
        precision = "-" if gate.precision is None else f"{gate.precision:.3f}"
        recall = "-" if gate.recall is None else f"{gate.recall:.3f}"
        lines.append(f"  entropy > {gate.tau}: gates {gate.gated_fraction:.2%} of positions, "
                     f"precision {precision}, recall {recall}")
    lines += [*spread_lines(report.spread), f"{report.verdict}: {report.reason}"]
    return [*lines, f"-> {Path(out) / REPORT_FILE}", *(f"-> {plot}" for plot in result.plots)]


def spread_lines(spread: RolloutSpread) -> list[str]:
    """How the differing positions fall over the completions, in words: one line, and one each for where they lie
    and for right against wrong completions where the report has those figures."""
    count = spread.per_rollout
    if count is None:
        return ["no completions compared"]
    lines = [f"per completion: {count.mean:.1f} differing positions (quartiles {count.q1:g}, {count.median:g}, "
             f"{count.q3:g}); {spread.with_any:.0%} of completions have one"]
    if spread.first is not None and spread.place is not None:
        place = spread.place
        lines.append(f"  the first at median token {spread.first.median:g}; their place in the completion, quartiles "
                     f"{place.q1:.0%}, {place.median:.0%}, {place.q3:.0%}")
    if spread.differ_fraction_right is not None or spread.differ_fraction_wrong is not None:
        right, wrong = (("-" if share is None else f"{share:.2%}")
                        for share in (spread.differ_fraction_right, spread.differ_fraction_wrong))
        lines.append(f"  differing share of tokens: right completions (reward > 0) {right}, wrong {wrong}")
    return lines


def intervention_lines(report: InterventionReport, out: str) -> list[str]:
    from steer.analysis.intervention import REPORT_FILE

    lines = []
    for name, arms in report.benchmarks.items():
        for arm, row in arms.items():
            recovered = f", recovers {row.recovered:.1%} of the RL gain" if row.recovered is not None else ""
            gated = f", substituted at {row.gated:.2%} of steps" if arm in ("gated", "random") else ""
            paired = "" if row.paired is None else f", against base {row.paired.figures()}"
            lines.append(f"{name} {arm:>6}: accuracy {row.accuracy:.3f}{paired}{gated}{recovered}")
    return [*lines, f"-> {Path(out) / REPORT_FILE}"]


def headroom_lines(report: HeadroomReport, out: str) -> list[str]:
    from steer.analysis.headroom import REPORT_FILE

    lines = [
        f"{report.problems} problems: base accuracy {report.base_accuracy:.3f}, {report.failures} failures, "
        f"{report.branched} with a decision point above tau = {report.tau:.3f} nats",
        f"decision points per failure: {report.decision_points:.1f}, {report.points_tried:.1f} branched (highest "
        f"entropy first; {report.untried_failures} failures had more); tries per failure: "
        f"{report.tries_per_failure:.1f} in each arm",
    ]
    for arm, row in report.arms.items():
        interval = "" if row.fixed_interval is None else "; 95% [{:.1%}, {:.1%}]".format(*row.fixed_interval)
        lines.append(f"  {arm:>8}: fixes {row.fixed}/{report.failures} failures ({row.fixed_share:.1%}{interval}); "
                     f"{row.try_success:.1%} of tries succeed")
    lines += [
        f"ceiling (decision-point switches, up to {len(report.fixed_by_round)} in a row) "
        f"{report.ceiling_accuracy:.3f}; one switch {report.one_switch_accuracy:.3f}; oracle at the highest-entropy "
        f"decision point {report.oracle_accuracy:.3f}",
        f"fixing tokens by base rank: {report.rank_counts or '-'}",
        f"verdict: {report.verdict}: {report.reason}",
        f"-> {Path(out) / REPORT_FILE}",
    ]
    return lines


@click.group()
def analyze() -> None:
    """Where steering could act and what it could gain: headroom on one model, or a base model against its
    RL-trained version (footprint, intervention)."""


@analyze.command("headroom")
@model_option
@data_options()
@out_option("Folder for the analysis.")
@settings_options(HeadroomSettings)
@click.option("--head", help="A trained head (folder or Hub id) whose tau and top-k to use instead of --tau, "
              "--tau-quantile and --top-k.")
@dtype_option
@cpu_option
@json_option
def headroom_command(model, data, out, question_field, answer_field, limit, head, cpu, dtype, as_json, **options):
    """Branch the base model's failed completions at their decision points and grade every branch, against as many
    tries at random calm steps and as many resamples: the ceiling of decision-point steering on this task.

    Ends in a verdict, go, no-go or unclear, with its reason. Use problems held back from evaluation. Writes
    OUT/headroom.json (and headroom.png with matplotlib); resumes in OUT; shares the branches among processes under
    `accelerate launch` or `torchrun`.
    """
    from steer.analysis.headroom import headroom
    from steer.head import CorrectionHead
    from steer.models import load_model
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.problems import load_problems

    if head is not None:
        config = CorrectionHead.from_pretrained(head).config
        options.update(tau=config.tau, top_k=config.top_k)
    workers = current_workers(cpu)
    problems = load_problems(data, question_field=question_field, answer_field=answer_field, limit=limit)
    lm, tokenizer = load_model(model, device=workers.device, dtype=model_dtype(dtype))
    report = headroom(lm, tokenizer, problems, out, settings_from(HeadroomSettings, options), workers=workers)
    if workers.is_main:
        emit(report, as_json, headroom_lines(report, out), out=out)


@analyze.command("footprint")
@pair_options
@data_options()
@out_option("Folder for the analysis.")
@settings_options(FootprintSettings, help={"samples": "RL completions per problem."})
@cpu_option
@json_option
def footprint_command(base, rl, data, out, question_field, answer_field, limit, cpu, as_json, **options):
    """Sample completions from the RL model and compare both models at every position of them.

    Reports how often the top-1 differs, the rank of the RL choice in the base distribution, the base entropy
    where they differ, and the precision and recall of the gate "entropy > tau"; writes OUT/footprint.json and,
    with matplotlib (`pip install steer[analysis]`), entropy and rank histograms. Sampling resumes in OUT.
    """
    from steer.analysis.footprint import footprint
    from steer.pipeline.distributed import Workers, current_workers
    from steer.pipeline.problems import load_problems

    launched = current_workers(cpu)
    if launched.world > 1:
        raise click.UsageError("footprint runs in one process; launch it without accelerate or torchrun")
    workers = Workers(device=launched.device)
    problems = load_problems(data, question_field=question_field, answer_field=answer_field, limit=limit)
    base_model, rl_model, tokenizer = load_pair(base, rl, workers)
    result = footprint(base_model, rl_model, tokenizer, problems, out, settings_from(FootprintSettings, options))
    emit(result, as_json, footprint_lines(result, out), out=out)


@analyze.command("intervene")
@pair_options
@data_options(multiple=True)
@out_option("Folder for the analysis.")
@click.option("--tau", default=PAPER_TAU, show_default=True, type=float, help="Entropy gate in nats.")
@settings_options(EvalSettings, help={"samples": "Decodes per problem and arm."})
@cpu_option
@json_option
def intervene_command(base, rl, sources, out, tau, question_field, answer_field, limit, cpu, as_json, **options):
    """Decode with the base model, substituting the RL model's top-1 where the base entropy exceeds TAU, and at as
    many random steps; compare with both models alone.

    Reports each arm's accuracy and the share of the RL gain the substitutions recover; writes OUT/arms,
    OUT/random and OUT/intervention.json. Resumes in OUT; shares work under `accelerate launch` or `torchrun`.
    """
    from steer.analysis.intervention import intervene
    from steer.pipeline.distributed import current_workers

    workers = current_workers(cpu)
    benchmarks = load_benchmarks(sources, question_field, answer_field, limit)
    base_model, rl_model, tokenizer = load_pair(base, rl, workers)
    settings = settings_from(EvalSettings, options)
    report = intervene(base_model, rl_model, tokenizer, benchmarks, out, settings, tau=tau, workers=workers)
    if workers.is_main:
        emit(report, as_json, intervention_lines(report, out), out=out)
