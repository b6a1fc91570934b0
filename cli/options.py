"""Options shared by several commands, and the one place that turns known failures into clean CLI errors."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from steer.head import HeadMismatchError
from steer.models import ModelLoadError
from steer.pool import NoContrastError
from steer.problems import ProblemFileError
from steer.processor import SteeringError
from steer.prompts import DEFAULT_INSTRUCTION
from steer.store import StoreError

# Failures whose message already says what is wrong and where: shown as "Error: <message>", exit status 1.
KNOWN_ERRORS = (
    ProblemFileError, StoreError, ModelLoadError, NoContrastError, HeadMismatchError, SteeringError,
    FileNotFoundError, ValueError,
)


def reports_errors(command: Callable) -> Callable:
    """Decorate a command so that known failures end it with their message instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KNOWN_ERRORS as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def model_option(command: Callable) -> Callable:
    return click.option("--model", "-m", required=True, help="Model folder or Hugging Face model id.")(command)


def json_option(command: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object (last line) instead of text.")(
        command
    )


def cpu_option(command: Callable) -> Callable:
    return click.option("--cpu", is_flag=True, help="Run on the CPU even where a GPU is available.")(command)


def data_options(command: Callable) -> Callable:
    """--question-field, --answer-field and --limit, for commands that read a benchmark."""
    command = click.option("--limit", type=click.IntRange(min=1), help="Use only the first N problems.")(command)
    command = click.option("--answer-field", help="Field holding the gold answer (default: detected).")(command)
    return click.option("--question-field", help="Field holding the problem text (default: detected).")(command)


def decoding_options(samples: int, max_new_tokens: int, samples_help: str) -> Callable[[Callable], Callable]:
    """--samples, --temperature, --top-p, --max-new-tokens, --batch-size, --seed and --instruction, for commands
    that decode benchmark problems, with their own defaults for `samples` and `max_new_tokens`."""
    options = [
        click.option("--samples", default=samples, show_default=True, type=click.IntRange(min=1), help=samples_help),
        click.option("--temperature", default=0.6, show_default=True, type=click.FloatRange(min=0),
                     help="0 is greedy."),
        click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--max-new-tokens", default=max_new_tokens, show_default=True, type=click.IntRange(min=1)),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--instruction", default=DEFAULT_INSTRUCTION, show_default=True,
                     help="Appended to each question."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def emit(summary: Any, as_json: bool, lines: list[str]) -> None:
    """Print a result: the human-readable `lines`, or the summary as one JSON object."""
    if as_json:
        data = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else summary
        click.echo(json.dumps(data, default=lambda value: str(value) if isinstance(value, Path) else repr(value)))
    else:
        for line in lines:
            click.echo(line)
