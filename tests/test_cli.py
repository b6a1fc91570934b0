"""The command line: help on every command (without importing torch), version, `steer info`, `python -m steer`."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from steer.cli.main import main
from steer.version import __version__


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        found += all_commands(command, (*prefix, name)) if isinstance(command, click.Group) else [(*prefix, name)]
    return found


@pytest.mark.parametrize("path", all_commands(main), ids=lambda path: " ".join(path) or "steer")
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


HEAVY = ("torch", "transformers")
# Runs `steer ARGS` as the console script does, then reports which heavy modules the process imported.
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("heavy:" + ",".join(m for m in {heavy!r} if m in sys.modules)))
sys.argv = ["steer", *{args!r}]
runpy.run_module("steer", run_name="__main__")
"""


@pytest.mark.parametrize("args", [*([*path, "--help"] for path in all_commands(main)), ["--version"], ["rollut"]],
                         ids=lambda args: " ".join(args))
def test_help_version_and_typos_import_neither_torch_nor_transformers(args):
    code = PROBE.format(heavy=HEAVY, args=args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == (2 if args == ["rollut"] else 0), out.stderr
    assert "No such command 'rollut'" in out.stderr if args == ["rollut"] else "steer" in out.stdout
    assert out.stdout.splitlines()[-1] == "heavy:", f"steer {' '.join(args)} imported {out.stdout.splitlines()[-1]}"


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_json_reports_versions_and_device():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steer"] == __version__ and report["torch"] and report["device"]


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run([sys.executable, "-m", "steer", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


@pytest.mark.parametrize("scales, message", [("1,two", "expected numbers"), ("1,-2", "finite and >= 0")])
def test_train_refuses_bad_strengths(tmp_path, scales, message):
    result = CliRunner().invoke(main, ["train", "-m", "unused", "-r", str(tmp_path), "-o", str(tmp_path / "head"),
                                       "--scales", scales])
    assert result.exit_code == 2 and message in result.output, result.output
