"""`steer serve`: vLLM's OpenAI-compatible server with a steered model.

vLLM's own command line takes every option but the steering: [`server_arguments`] parses them with vLLM's parser and
adds the steered architecture, the head and the worker extension to what the engine receives, as
[`steer.integrations.vllm.steered_llm`] does offline; [`serve`] then runs vLLM's server in this process.

Beside vLLM's routes the server answers `GET /steer/stats` ([`steering_stats_route`]): the engine's steering
counters since it started, as [`steer.integrations.vllm.steering_stats`] reads them offline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from steer.integrations.vllm import (
    check_engine_arguments,
    describe_head,
    engine_defaults,
    require_vllm,
    steer_overrides,
)

STATS_PATH = "/steer/stats"
STATS_MIDDLEWARE = "steer.integrations.vllm.serve.steering_stats_route"
# The server options that [`engine_defaults`] reads or fills in: a user's value wins over its default.
ENGINE_SETTINGS = ("worker_extension_cls", "kv_cache_memory_bytes", "logits_processors", "enable_chunked_prefill",
                   "max_num_batched_tokens", "max_model_len", "revision", "trust_remote_code", "tokenizer")


async def steering_stats_route(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """vLLM's server middleware (`--middleware`) that answers `GET /steer/stats` with the steering counters summed
    over the engine's workers: `{"steps", "rows", "gated", "changed", "gated_fraction", "changed_fraction"}` (see
    [`SteeringStats`]); every other request goes on to vLLM."""
    if request.method != "GET" or request.url.path != STATS_PATH:
        return await call_next(request)
    from fastapi.responses import JSONResponse

    from steer.processor import SteeringStats

    counts = await request.app.state.engine_client.collective_rpc("steer_stats")
    steps, rows, gated, changed = (sum(column) for column in zip(*counts))
    stats = SteeringStats(steps=steps, rows=rows, gated=gated, changed=changed)
    return JSONResponse({"steps": steps, "rows": rows, "gated": gated, "changed": changed,
                         "gated_fraction": stats.gated_fraction, "changed_fraction": stats.changed_fraction})


def server_arguments(model: str, head: str, host: str, port: int, vllm_args: Sequence[str]) -> argparse.Namespace:
    """vLLM's server arguments for `model` steered by `head`, with `vllm_args` (vLLM's own options) passed through.

    Raises:
        [`SteerError`]: what [`steered_llm`] refuses (another model's head, an unsupported architecture, tensor
            parallelism, speculative decoding).
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="steer serve"))
    args = parser.parse_args(["--model", model, "--host", host, "--port", str(port), *vllm_args])
    check_engine_arguments(vars(args))
    args.hf_overrides = {**(args.hf_overrides or {}), **steer_overrides(model, head)}
    # What the user set, told from vLLM's defaults (some are not None: `worker_extension_cls` defaults to "")
    defaults = vars(parser.parse_args(["--model", model]))
    given = {name: value for name in ENGINE_SETTINGS
             if (value := getattr(args, name, None)) != defaults.get(name)}
    for name, value in engine_defaults(model, given).items():
        setattr(args, name, value)
    args.middleware = [*(args.middleware or []), STATS_MIDDLEWARE]
    validate_parsed_serve_args(args)
    return args


def serve(model: str, head: str, host: str, port: int, vllm_args: Sequence[str]) -> None:
    """Run the server until it is stopped; logs the head it loaded."""
    require_vllm()
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    args = server_arguments(model, head, host, port, vllm_args)
    print(f"steer: {describe_head(args.hf_overrides['steer_head'])} on {model}", file=sys.stderr, flush=True)
    uvloop.run(run_server(args))
