"""`steer tune`: choose a head's strength by decoded accuracy on held-out problems."""

from __future__ import annotations

import click

from steer.cli.evaluate import load_benchmarks
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
from steer.settings import TuneSettings


@click.command("tune")
@model_option
@click.option("--head", required=True, help="The head folder (or Hub id) whose strength to choose.")
@data_options(multiple=True)
@out_option("Folder for the decodes, tune.json and the tuned head (OUT/head).")
@settings_options(TuneSettings, help={"samples": "Decodes per problem and strength.",
                                      "scales": "Strengths (head.scale) tried; 0, the base model, always is."})
@engine_option
@dtype_option
@cpu_option
@json_option
def tune_command(model, head, sources, out, question_field, answer_field, limit, engine, engine_args, cpu, dtype,
                 as_json, **options):
    """Decode held-out problems with the base model and the head at each strength, and keep the smallest strength
    whose accuracy is within one standard error of the best (0 switches the head off): OUT/head.

    Use problems the head did not train on and that you will not report: a split of the training benchmark.
    Resumes like `steer eval`; with --engine vllm one steered engine serves every strength.
    """
    from steer.head import CorrectionHead
    from steer.pipeline.distributed import current_workers
    from steer.pipeline.tuning import tune_strength

    workers = current_workers(cpu)
    settings = settings_from(TuneSettings, options)
    benchmarks = load_benchmarks(sources, question_field, answer_field, limit)
    lm, tokenizer, steered = decoding_models(engine, model, head, dtype, settings.seed, workers, engine_args)
    steering = CorrectionHead.from_pretrained(head)
    if steered is None:
        steering.check_compatible(lm)
    result = tune_strength(lm, tokenizer, steering, benchmarks, out, settings, steered=steered, workers=workers)
    if result is None:
        return
    lines = [f"{result.problems} held-out problems"]
    for o in result.outcomes:
        against = "" if o.difference is None else f"   {o.difference:+.3f} vs base (p = {o.p_value:.3g})"
        lines.append(f"  x{o.scale:<4g} accuracy {o.accuracy:.3f} +- {o.standard_error:.3f}{against}")
    kept = ("strength 0: no strength beats the base model by a standard error, so the head is switched off"
            if result.switched_off else f"strength x{result.scale:g}")
    emit(result, as_json, [*lines, f"kept {kept} -> {result.head}"], head=result.head)
