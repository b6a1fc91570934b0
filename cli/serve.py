"""`steer serve`: vLLM's OpenAI-compatible server with a steered model."""

from __future__ import annotations

import click


@click.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", "-m", required=True, help="Model folder or Hugging Face id (a supported architecture).")
@click.option("--head", required=True, help="Correction head folder or Hub id, made for MODEL.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve_command(model: str, head: str, host: str, port: int, vllm_args: tuple[str, ...]) -> None:
    """Start vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, ...) with MODEL steered by HEAD
    at every decoding step of every request.

    Every other option goes to vLLM's server as is (for example --dtype float32 --max-model-len 4096
    --served-model-name NAME; see `python -m vllm.entrypoints.openai.api_server --help`). Needs vLLM: `pip install
    "steer-lm[vllm]"` with CUDA, `python -m steer.integrations.vllm.install_cpu` on a CPU.
    """
    from steer.integrations.vllm.serve import serve

    serve(model, head, host, port, list(vllm_args))
