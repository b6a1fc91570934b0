"""`steer eval`: decode benchmarks with the base model and, given a head, the steered model; grade and compare."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from steer.cli.options import (
    cpu_option,
    data_options,
    dtype_option,
    emit,
    engine_option,
    json_option,
    model_option,
    out_option,
)
from steer.cli.pipeline import decoding_models
from steer.cli.settings import settings_from, settings_options
from steer.settings import EvalSettings

if TYPE_CHECKING:
    from steer.pipeline.problems import Problem
    from steer.pipeline.summary import EvalSummary

LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


def split_label(source: str) -> tuple[str, str]:
    """`"name=path"` -> `("name", "path")`; a plain path or dataset name is labelled by its file stem or name."""
    label, sep, rest = source.partition("=")
    if sep and rest and LABEL.match(label):
        return label, rest
    return (Path(source).stem if Path(source).suffix else source.replace("/", "_")), source


def load_benchmarks(sources: tuple[str, ...], question_field: str | None, answer_field: str | None,
                    limit: int | None) -> dict[str, list[Problem]]:
    """The problems of each `--data` source, by label (see [`split_label`])."""
    from steer.pipeline.problems import load_problems

    benchmarks = {}
    for source in sources:
        label, path = split_label(source)
        if label in benchmarks:
            raise click.UsageError(f"two --data sources are labelled {label!r}; name them with LABEL=PATH")
        benchmarks[label] = load_problems(path, question_field=question_field, answer_field=answer_field,
                                          benchmark=label, limit=limit)
    return benchmarks


def results_table(summary: EvalSummary) -> list[str]:
    """The summary as aligned text lines: one row per benchmark and arm, then the paired comparison."""
    rows = [("benchmark", "arm", "problems", "accuracy", "95% interval", "pass@k", "gated", "changed")]
    notes = []
    for name, benchmark in summary.benchmarks.items():
        for arm, a in benchmark.arms.items():
            low, high = a.interval_95
            passes = " ".join(f"@{k}={v:.3f}" for k, v in a.pass_at_k.items() if k != "1")
            acted = arm != "base" and a.gated_fraction > 0
            rows.append((name, arm, str(a.problems), f"{a.accuracy:.3f}", f"[{low:.3f}, {high:.3f}]",
                         passes or "-", f"{a.gated_fraction:.1%}" if acted else "-",
                         f"{a.changed_fraction:.1%}" if acted else "-"))
        for arm, p in benchmark.paired.items():
            notes.append(f"{name}: {arm} - base = {p.figures()}: {p.verdict()}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    run = summary.run
    return [*lines, *notes, f"{run.tokens} new tokens in {run.seconds:.1f} s "
            f"({run.tokens_per_second:.1f} tokens/s, {run.processes} process(es))"]


@click.command("eval")
@model_option
@data_options(multiple=True)
@out_option("Folder for predictions, summary.")
@click.option("--head", help="Correction head folder (or Hub id): adds the steered arm.")
@settings_options(EvalSettings, help={"samples": "Decodes per problem and arm."})
@click.option("--trace", is_flag=True, help="Also record each decode's per-step entropy, gating and top-k "
              "candidates (the head's top-k, else 5) into OUT/traces/, for `steer view --run OUT` (hf engine).")
@engine_option
@dtype_option
@cpu_option
@json_option
def evaluate_command(model, sources, out, head, question_field, answer_field, limit, trace, engine, engine_args, cpu,
                     dtype, as_json, **options):
    """Decode benchmarks with the base model and (with --head) the steered one, grade, and compare them.

    Writes OUT/predictions.jsonl as it goes (an interrupted run resumes) and OUT/summary.json at the end. Under
    `accelerate launch -m steer eval ...` (or `torchrun --nproc_per_node N -m steer eval ... --cpu` on CPUs) the work
    is shared among processes and merged by the main one.
    """
    from steer.head import CorrectionHead
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.evaluation import Arm, evaluate, head_digest
    from steer.pipeline.folders.predictions import SUMMARY_FILE, PredictionFolder
    from steer.pipeline.tracing import DEFAULT_TRACE_TOP_K

    if trace and engine != "hf":
        raise click.UsageError("--trace records traces in transformers' generate: use it with --engine hf")
    workers = current_workers(cpu)
    settings = settings_from(EvalSettings, options)
    benchmarks = load_benchmarks(sources, question_field, answer_field, limit)
    lm, tokenizer, steered = decoding_models(engine, model, head, dtype, settings.seed, workers, engine_args)
    steering = CorrectionHead.from_pretrained(head) if head else None
    if steered is not None:  # vLLM: one engine, steering off for base and on for the steered arm
        arms = [Arm("base", lm), Arm("steered", steered, digest=head_digest(steering), tau=steering.tau)]
        summary = evaluate(lm, tokenizer, benchmarks, out, settings, arms=arms, workers=workers)
    else:
        if steering is not None:
            steering.check_compatible(lm)
        trace_top_k = (steering.top_k if steering is not None else DEFAULT_TRACE_TOP_K) if trace else None
        summary = evaluate(lm, tokenizer, benchmarks, out, settings, head=steering, workers=workers,
                           trace_top_k=trace_top_k)
    if workers.is_main:
        emit(summary, as_json, [*results_table(summary), f"-> {PredictionFolder(out).path / SUMMARY_FILE}"], out=out)
