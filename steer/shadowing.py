"""Keep a clone's top-level folders from shadowing installed packages of the same name.

`kernels/` and `cli/` sit at a clone's root and install as `steer.kernels` and `steer.cli`. A Python process started
in the root (`python -c`, a notebook, `python -m ...`) has the root first on `sys.path`, so `import kernels` finds
the folder before Hugging Face's `kernels` package, which `transformers` imports whenever a model config loads. Each
folder's `__init__.py` calls :func:`yield_to_installed` when it is imported under its bare name, which puts the
installed package in its place.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def yield_to_installed(name: str, init_file: str) -> None:
    """Replace the module `name` in `sys.modules` by the installed package of that name, if one exists.

    `init_file` is the `__file__` of the folder's `__init__.py`; the folder's parent (the clone's root) is left out of
    the search. Python's import returns whatever `sys.modules[name]` holds once the module has run, so the caller's
    `import kernels` receives the installed package. Where no package of that name is installed, the folder stays
    what it was: an empty module with no version, which `transformers` reads as "not installed".

    Example (in `kernels/__init__.py`):

        if __name__ == "kernels":
            from steer.shadowing import yield_to_installed
            yield_to_installed(__name__, __file__)
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
