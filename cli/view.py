"""`steer view`: an HTML page of where steering acted, from a prompt or from a `steer eval --trace` run."""

from __future__ import annotations

import click

from steer.cli.options import cpu_option, emit, json_option
from steer.settings import DecodingSettings


@click.command("view")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="A `steer eval --trace` output folder to show.")
@click.option("--model", "-m", help="Model folder or Hub id (with --prompt).")
@click.option("--head", help="Correction head folder or Hub id (with --prompt).")
@click.option("--prompt", "-p", help="A question to decode base and steered, side by side.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Token budget per completion (with --prompt).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature (with --prompt); 0 is greedy.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds sampling (with --prompt).")
@click.option("--instruction", default="", help="Appended to the prompt (with --prompt).")
@click.option("--limit", type=click.IntRange(min=1), help="Show only the first N problems of the run (with --run).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@cpu_option
@json_option
def view_command(run_dir, model, head, prompt, max_new_tokens, temperature, seed, instruction, limit, out, cpu,
                 as_json) -> None:
    """Write a self-contained HTML page (open it from disk) of a completion token by token: base entropy as
    colour, the head's decision points underlined, the steps where steering changed the top-1 outlined, and on
    hover the base top-k beside the steered probabilities.

    Either --run DIR (a `steer eval --trace` folder: paginated, filterable by failed and changed), or --model,
    --head and --prompt (decoded base and steered, greedy by default).
    """
    from steer.analysis.view import view_from_prompt, view_from_run, write_view

    if (run_dir is None) == (prompt is None):
        raise click.UsageError("give either --run DIR or --prompt TEXT (with --model and --head)")
    if run_dir is not None:
        if model or head:
            raise click.UsageError("--model and --head go with --prompt; a --run folder's traces are self-contained")
        page = view_from_run(run_dir, limit=limit)
    else:
        if not model or not head:
            raise click.UsageError("--prompt needs --model and --head")
        import torch

        from steer.head import CorrectionHead
        from steer.models import load_model

        device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
        lm, tokenizer = load_model(model, device=device)
        steering = CorrectionHead.from_pretrained(head)
        steering.check_compatible(lm)
        settings = DecodingSettings(temperature=temperature, max_new_tokens=max_new_tokens)
        page = view_from_prompt(lm, tokenizer, steering, prompt, settings, instruction=instruction, seed=seed)
    result = write_view(page, out)
    emit(result, as_json, [f"{result.items} item(s), {result.steps} traced tokens, {result.changed} changed by "
                           f"steering ({result.bytes / 1e6:.1f} MB) -> {result.out}"])
