"""Entry point of the `steer` command: the click group every command is registered on, and the one place that turns
known failures into one-line errors.

Commands are loaded lazily: a command's module is imported only when that command runs (or its help is shown), and
the command modules import torch, transformers and the pipeline inside their functions, so that `steer --help`,
`steer CMD --help`, `steer --version` and a mistyped command answer at once.
"""

from __future__ import annotations

import importlib

import click

from steer.errors import SteerError
from steer.version import __version__

# Failures whose message already says what is wrong and where: shown as "Error: <message>", exit status 1.
KNOWN_ERRORS = (SteerError, FileNotFoundError, ValueError)

# Command name -> "module:attribute" of its click command.
COMMANDS = {
    "analyze": "steer.cli.analyze:analyze",
    "bench": "steer.cli.bench:bench",
    "demo": "steer.cli.demo:demo",
    "eval": "steer.cli.evaluate:evaluate_command",
    "export": "steer.cli.export:export_command",
    "import-rollouts": "steer.cli.pipeline:import_rollouts_command",
    "info": "steer.cli.info:info",
    "label": "steer.cli.pipeline:label",
    "rollout": "steer.cli.pipeline:rollout",
    "score": "steer.cli.pipeline:score",
    "serve": "steer.cli.serve:serve_command",
    "train": "steer.cli.pipeline:train",
    "tune": "steer.cli.tune:tune_command",
    "view": "steer.cli.view:view_command",
    "world": "steer.cli.demo:world_command",
}


class SteerGroup(click.Group):
    """A click group that imports a command's module only when the command is looked up ([`COMMANDS`]), and whose
    commands end known failures ([`KNOWN_ERRORS`]) with their message, not a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KNOWN_ERRORS as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=SteerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="steer")
def main() -> None:
    """Steer a language model's decision points at decoding time: rollouts, head training, steered decoding."""
