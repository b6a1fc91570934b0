"""The docstrings' examples run, as written, in every module that imports without an optional extra.

Examples follow `transformers`' convention: a fenced ```python block whose closing fence comes right after the
expected output. Python's doctest would read that fence as output, so [`FencedParser`] ends the output at the fence.
Examples that need a model, a GPU or a run folder carry `# doctest: +SKIP`.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import steer
import steer.cli
import steer.kernels

# Packages whose modules or examples need an optional extra: vLLM, or the files a `custom_generate` export writes.
NEEDS_EXTRA = ("steer.integrations.vllm", "steer.custom_generate")
FENCE = re.compile(r"^([ \t]*```)", re.MULTILINE)


class FencedParser(doctest.DocTestParser):
    """A doctest parser that ends an example's expected output at a closing code fence."""

    def parse(self, string: str, name: str = "<string>"):
        return super().parse(FENCE.sub(r"\n\1", string), name)


def modules() -> list[str]:
    names = []
    for package in (steer, steer.cli, steer.kernels):  # the last two install from the clone's root folders
        names += [info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return sorted({name for name in names if not name.startswith(NEEDS_EXTRA) and not name.endswith("__main__")})


@pytest.mark.parametrize("name", modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    reports: list[str] = []
    for test in doctest.DocTestFinder(parser=FencedParser()).find(module, name):
        runner.run(test, out=reports.append)
    assert runner.failures == 0, "\n".join(reports)
