"""Entry point of the `steer` command: the click group every command is registered on."""

from __future__ import annotations

import click

from steer.cli.analyze import analyze
from steer.cli.bench import bench
from steer.cli.demo import demo, world_command
from steer.cli.evaluate import evaluate_command
from steer.cli.info import info
from steer.cli.pipeline import rollout, score, train
from steer.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="steer")
def main() -> None:
    """Steer a language model's decision points at decoding time: rollouts, head training, steered decoding."""


main.add_command(analyze)
main.add_command(bench)
main.add_command(demo)
main.add_command(info)
main.add_command(rollout)
main.add_command(score)
main.add_command(train)
main.add_command(evaluate_command)
main.add_command(world_command)
