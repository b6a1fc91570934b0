"""Options shared by several commands, and how a command prints its result (text, or one JSON object)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch


def model_option(command: Callable) -> Callable:
    return click.option("--model", "-m", required=True, help="Model folder or Hugging Face model id.")(command)


def out_option(help: str) -> Callable[[Callable], Callable]:
    """--out/-o, a required folder."""
    return click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help=help)


def json_option(command: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object (last line) instead of text.")(
        command
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype_option(command: Callable) -> Callable:
    """--dtype: the model's weights; see [`model_dtype`]."""
    return click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
                        help="Weights' dtype: auto is bfloat16 on a GPU that supports it, float32 on the CPU. On 2 CPU "
                        "cores bfloat16 decoded SmolLM2-135M 1.5-1.9x faster but changed about half of its greedy "
                        "completions (benches/rollout_speed.py).")(command)


def model_dtype(name: str) -> torch.dtype | None:
    """`None` for "auto" (the device's default, see `steer.models.default_dtype`), else the named torch dtype."""
    if name == "auto":
        return None
    import torch

    return getattr(torch, name)


ENGINES = ("hf", "vllm")


def engine_option(command: Callable) -> Callable:
    """--engine: transformers' generate or vLLM (steer.integrations.vllm), and --engine-arg: vLLM's own arguments."""
    command = click.option("--engine-arg", "engine_args", multiple=True, callback=_engine_arguments,
                           metavar="NAME=VALUE",
                           help="An argument of vllm.LLM for --engine vllm (repeatable; VALUE is read as JSON where it "
                           "parses, else as text): for example --engine-arg max_model_len=2048 --engine-arg "
                           "enforce_eager=true.")(command)
    return click.option("--engine", default="hf", show_default=True, type=click.Choice(ENGINES),
                        help="Decoding engine: transformers' generate (hf), or vLLM, one engine per process with its "
                        "own batching (needs vLLM: steer.integrations.vllm).")(command)


def _engine_arguments(context: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    """`("max_model_len=2048", "enforce_eager=true")` -> `{"max_model_len": 2048, "enforce_eager": True}`."""
    arguments = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"{value!r} is not NAME=VALUE (for example max_model_len=2048)",
                                     context, parameter)
        try:
            arguments[name] = json.loads(text)
        except json.JSONDecodeError:
            arguments[name] = text
    return arguments


def cpu_option(command: Callable) -> Callable:
    return click.option("--cpu", is_flag=True, help="Run on the CPU even where a GPU is available.")(command)


def data_options(multiple: bool = False) -> Callable[[Callable], Callable]:
    """--data (one benchmark, or with `multiple` several, each LABEL=PATH or a path), --question-field,
    --answer-field and --limit, for commands that read benchmarks."""
    if multiple:
        data = click.option("--data", "-d", "sources", multiple=True, required=True, help="Benchmark file (JSONL, "
                            "JSON, parquet) or dataset name; LABEL=PATH names it. Repeatable.")
    else:
        data = click.option("--data", "-d", required=True,
                            help="Benchmark file (JSONL, JSON, parquet) or dataset name.")
    options = [
        data,
        click.option("--question-field", help="Field holding the problem text (default: detected)."),
        click.option("--answer-field", help="Field holding the gold answer (default: detected)."),
        click.option("--limit", type=click.IntRange(min=1), help="Use only the first N problems."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def emit(result: Any, as_json: bool, lines: list[str], **extra: Any) -> None:
    """Print a result: the human-readable `lines`, or the result (a dataclass or a dict) and `extra` fields as one
    JSON object."""
    if as_json:
        data = {**_jsonable(result), **extra}
        click.echo(json.dumps(data, default=lambda value: _jsonable(value) if dataclasses.is_dataclass(value)
                              else str(value) if isinstance(value, Path) else repr(value)))
    else:
        for line in lines:
            click.echo(line)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
