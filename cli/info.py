"""`steer info`: versions, device, and which kernel path is active."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import click

from steer.version import __version__


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """What `steer info` reports, as a dictionary."""
    import torch

    from steer.functional import active_kernel

    cuda = torch.cuda.is_available()
    return {
        "steer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "threads": torch.get_num_threads(),
        "kernel": active_kernel(),
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def info(as_json: bool) -> None:
    """Show versions of steer, torch, transformers and triton, the device, and the active kernel path."""
    report = environment()
    if as_json:
        click.echo(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        click.echo(f"{key:<{width}}  {value if value is not None else '-'}")
