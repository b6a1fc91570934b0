"""Entry point of the `steer` command: the click group every command is registered on, and the one place that turns
known failures into one-line errors."""

from __future__ import annotations

import click

from steer.cli.analyze import analyze
from steer.cli.bench import bench
from steer.cli.demo import demo, world_command
from steer.cli.evaluate import evaluate_command
from steer.cli.export import export_command
from steer.cli.info import info
from steer.cli.pipeline import import_rollouts_command, label, rollout, score, train
from steer.cli.view import view_command
from steer.errors import SteerError
from steer.version import __version__

# Failures whose message already says what is wrong and where: shown as "Error: <message>", exit status 1.
KNOWN_ERRORS = (SteerError, FileNotFoundError, ValueError)


class SteerGroup(click.Group):
    """A click group whose commands end known failures ([`KNOWN_ERRORS`]) with their message, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KNOWN_ERRORS as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=SteerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="steer")
def main() -> None:
    """Steer a language model's decision points at decoding time: rollouts, head training, steered decoding."""


main.add_command(analyze)
main.add_command(bench)
main.add_command(demo)
main.add_command(import_rollouts_command)
main.add_command(info)
main.add_command(label)
main.add_command(rollout)
main.add_command(score)
main.add_command(train)
main.add_command(evaluate_command)
main.add_command(export_command)
main.add_command(world_command)
main.add_command(view_command)
