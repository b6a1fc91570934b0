"""`steer export`: a head as a folder that `model.generate(custom_generate=...)` runs, with its model card."""

from __future__ import annotations

import click

from steer.cli.options import emit, json_option


@click.command("export")
@click.option("--head", "head_path", required=True, help="Correction head folder (or Hub id).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write (created).")
@click.option("--model", "-m", "base_model", help="Base model folder or id, for the card (default: the head's).")
@click.option("--eval", "eval_dir", type=click.Path(exists=True, file_okay=False),
              help="A `steer eval --head` output folder of this head, reported in the card.")
@json_option
def export_command(head_path: str, out: str, base_model: str | None, eval_dir: str | None, as_json: bool) -> None:
    """Write a head, a custom_generate/ method and a model card into OUT, so that
    `model.generate(**inputs, custom_generate=OUT, trust_remote_code=True)` decodes with steering, without steer
    (transformers >= 5.17.0). Push OUT to the Hub to share it."""
    from steer.export import MIN_TRANSFORMERS, export_head

    result = export_head(head_path, out, base_model=base_model, eval_dir=eval_dir)
    lines = [
        f"head for {result.base_model}: {result.head_parameters:,} parameters "
        f"({result.share:.4%} of the model's {result.model_parameters:,}); evaluation: {result.evaluation}",
        *(f"  {result.out_dir / name}" for name in result.files),
        f"use: model.generate(**inputs, custom_generate={str(result.out_dir)!r}, trust_remote_code=True)"
        f"  (transformers >= {MIN_TRANSFORMERS})",
    ]
    emit(result, as_json, lines)
