"""A Python process started in a clone's root must not let the root's `kernels/` or `cli/` shadow installed packages."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "cli")


def installed(name: str) -> bool:
    """Whether a package `name` is installed, outside the clone's root folders."""
    elsewhere = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != ROOT]
    return importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None


def run_in_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` with the clone's root as its working directory (so the root is first on `sys.path`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONSAFEPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", FOLDERS)
def test_an_installed_package_wins_over_the_root_folder(tmp_path: Path, name: str) -> None:
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("MARK = 'installed'\n")
    (package / "part.py").write_text("from . import MARK as OWNER\n")
    result = run_in_root(
        f"""
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]
        import {name}
        from {name}.part import OWNER
        print({name}.MARK, OWNER, {name}.__file__)
        import steer.{name}  # the project's own folder still installs under steer.
        print(steer.{name}.__file__)
        """,
        extra_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"installed installed {package}"), lines
    assert lines[1] == str(ROOT / name / "__init__.py"), lines


@pytest.mark.parametrize("name", FOLDERS)
def test_without_an_installed_package_the_name_stays_empty(name: str) -> None:
    if installed(name):
        pytest.skip(f"a package named {name} is installed")
    result = run_in_root(f"import {name}; print(getattr({name}, '__version__', 'none'))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_transformers_loads_a_config_and_a_head_is_made_in_the_root() -> None:
    if not installed("kernels"):
        pytest.skip("Hugging Face's kernels package is not installed")
    result = run_in_root(
        """
        import kernels
        from transformers import AutoConfig, AutoModelForCausalLM
        import steer
        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
        model = AutoModelForCausalLM.from_config(config)
        head = steer.CorrectionHead.for_model(model, rank=2, top_k=5, tau=1.0)
        print(kernels.__file__)
        print(type(head).__name__, head.config.rank)
        """
    )
    assert result.returncode == 0, result.stderr
    origin, made = result.stdout.splitlines()[-2:]
    assert not Path(origin).is_relative_to(ROOT / "kernels"), origin
    assert made == "CorrectionHead 2"
