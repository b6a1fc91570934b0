"""`steer serve` under an operator's load, against the same vLLM server unsteered.

    python -m steer.integrations.vllm.install_cpu        # on a CPU, once
    python benches/serve_load.py --model benches/models/SmolLM2-135M-Instruct

Each server (plain vLLM, then `steer serve` with an untrained head at tau = 0, so every row is gated and run through
the correction: the most work steering can do) starts on 127.0.0.1 with the same engine settings, takes a few
warm-up requests, then a load of `--requests` requests at each concurrency of `--concurrency`
([`steer.integrations.vllm.load.mixed_requests`]: prompts of mixed lengths, up to `--max-tokens` new tokens, half
greedy and half sampled, half streamed, about 5% malformed and 5% clients that hang up after the first streamed
event). Recorded per server and concurrency: requests per second, p50 and p99 latency of the answered requests, and
what became of every request (answered, refused with a 4xx, failed); for the steered server also the steering
counters of `GET /steer/stats`, and whether the server still answers after the load.

Writes `benches/results/serve-load-<model>-<device>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.integrations.vllm.load import LoadRequest, LoadSummary, mixed_requests, run_load, send
from steer.models import load_model
from steer.pipeline.problems import load_problems

ROOT = Path(__file__).resolve().parent
GSM8K = ROOT.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
MODEL_NAME = "served"
# The plain server: vLLM's own, with the engine settings `steer serve` gives (a CPU's KV cache and whole prefills).
PLAIN_SERVER = """
import sys, uvloop
from vllm.entrypoints.launchers.api_server.entry import run_server
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.utils.argparse_utils import FlexibleArgumentParser
from steer.integrations.vllm import engine_defaults

if __name__ == "__main__":
    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    for name, value in engine_defaults(args.model, {"max_model_len": args.max_model_len}).items():
        if name not in ("worker_extension_cls", "logits_processors"):
            setattr(args, name, value)
    uvloop.run(run_server(args))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server and wait until it lists its model."""
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 900
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return process
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise SystemExit(f"the server did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(2)


def steering_counts(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/steer/stats", timeout=60) as response:
        return json.loads(response.read())


def put_load(port: int, prompts: list[str], args: argparse.Namespace) -> dict:
    """Warm-up, then each concurrency's load; the summaries and what became of each kind of request."""
    for prompt in prompts[:4]:
        send(port, LoadRequest({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}))
    levels = {}
    for concurrency in args.concurrency:
        requests = mixed_requests(prompts, args.requests, MODEL_NAME, seed=concurrency, max_tokens=args.max_tokens)
        start = time.perf_counter()
        results = run_load(port, requests, concurrency)
        seconds = time.perf_counter() - start
        whole = [r for q, r in zip(requests, results) if q.malformed is None and q.hang_up_after is None]
        levels[str(concurrency)] = {
            **asdict(LoadSummary.of(results, seconds)),
            "well_formed": len(whole), "well_formed_answered": sum(r.status == 200 for r in whole),
            "malformed": sum(q.malformed is not None for q in requests),
            "malformed_refused_4xx": sum(q.malformed is not None and 400 <= r.status < 500
                                         for q, r in zip(requests, results)),
            "hung_up": sum(q.hang_up_after is not None for q in requests),
            "completion_tokens": sum(r.completion_tokens or 0 for r in whole),
        }
        print(concurrency, json.dumps(levels[str(concurrency)]), flush=True)
    alive = send(port, LoadRequest({"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 4})).status == 200
    return {"levels": levels, "answers_after_load": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=GSM8K, help="questions to prompt with (default: GSM8K test)")
    parser.add_argument("--requests", type=int, default=120, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    questions = [p.question for p in load_problems(args.data)[:60]]
    prompts = [q[: 40 + 7 * i] for i, q in enumerate(questions)]  # mixed lengths: 40 characters to whole questions
    engine = ["--dtype", args.dtype, "--max-model-len", "1024", "--served-model-name", MODEL_NAME]
    record = {"command": " ".join(["python benches/serve_load.py", *sys.argv[1:]]),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}",
              "cores": len(os.sched_getaffinity(0)), "vllm": __import__("vllm").__version__,
              "requests_per_level": args.requests, "max_tokens": args.max_tokens, "servers": {}}
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = load_model(args.model, device="cpu", dtype=torch.float32)
        CorrectionHead.for_model(model, rank=16, top_k=5, tau=0.0, seed=0).save_pretrained(scratch)
        del model
        script = Path(scratch) / "plain_server.py"
        script.write_text(PLAIN_SERVER)
        for name in ("plain", "steered"):
            port = free_port()
            command = ([sys.executable, str(script), "--model", args.model] if name == "plain" else
                       [sys.executable, "-m", "steer", "serve", "-m", args.model, "--head", scratch])
            process = start([*command, "--port", str(port), *engine], port, Path(scratch) / f"{name}.log")
            try:
                before = steering_counts(port) if name == "steered" else None
                result = put_load(port, prompts, args)
                if before is not None:
                    after = steering_counts(port)
                    counters = ("steps", "rows", "gated", "changed")
                    result["steering"] = {key: after[key] - before[key] for key in counters}
                record["servers"][name] = result
            finally:
                process.terminate()
                process.wait(timeout=120)
    for level, steered in record["servers"]["steered"]["levels"].items():
        plain = record["servers"]["plain"]["levels"][level]
        steered["requests_per_second_vs_plain"] = steered["requests_per_second"] / plain["requests_per_second"]
    slug = Path(args.model).name
    out = ROOT / "results" / f"serve-load-{slug}-{record['device'].replace(' ', '-').lower()}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
