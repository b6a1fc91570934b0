"""A bounded load on an OpenAI-compatible completions server, as an operator would put on `steer serve` before
trusting it: mixed lengths, greedy and sampled, streamed and not, malformed requests, and clients that hang up in
the middle of a stream.

[`mixed_requests`] builds the load (deterministic for a seed), [`run_load`] sends it from a pool of threads (the
concurrency), and [`LoadSummary.of`] reduces the results to what a benchmark records: requests per second and
latency percentiles of the answered requests. Only the standard library is used, so the same client measures any
server.

Example:

```python
>>> requests = mixed_requests(["2+3=", "Count: 1 2"], count=40, model="tiny", seed=0)  # doctest: +SKIP
>>> start = time.perf_counter(); results = run_load(8000, requests, concurrency=8)  # doctest: +SKIP
>>> LoadSummary.of(results, time.perf_counter() - start).p99_seconds  # doctest: +SKIP
```
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# What a malformed request looks like, and why a server must refuse it with a 4xx.
MALFORMED = ("not json", "negative max_tokens", "no prompt", "unknown model")


@dataclass(frozen=True)
class LoadRequest:
    """One request of a load.

    Attributes:
        body (`dict`): the JSON body of `POST /v1/completions` (for `malformed="not json"`, sent as broken text).
        hang_up_after (`int`, *optional*): for a streamed request, close the connection after this many events.
        malformed (`str`, *optional*): which of [`MALFORMED`] this request is; the server must answer 4xx.
    """

    body: dict
    hang_up_after: int | None = None
    malformed: str | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def greedy(self) -> bool:
        return self.body.get("temperature") == 0 and self.malformed is None

    def unstreamed(self) -> LoadRequest:
        """The same request answered in one response (an OpenAI server refuses `stream_options` without a
        stream)."""
        body = {key: value for key, value in self.body.items() if key != "stream_options"}
        return LoadRequest({**body, "stream": False}, malformed=self.malformed)


@dataclass(frozen=True)
class LoadResult:
    """What one request got: the HTTP `status`, the completion `text` and its `completion_tokens` (from the usage
    field; `None` for a refused request or a hang-up), the wall time, and an `error` message when the connection
    itself failed."""

    status: int
    text: str | None
    completion_tokens: int | None
    seconds: float
    error: str | None = None


def mixed_requests(prompts: Sequence[str], count: int, model: str, seed: int = 0, max_tokens: int = 32,
                   malformed_share: float = 0.05, hang_up_share: float = 0.05) -> list[LoadRequest]:
    """`count` requests over `prompts`: lengths up to `max_tokens`, half greedy and half sampled (T 0.7, each with
    its own seed), half streamed; about `malformed_share` malformed and `hang_up_share` streamed clients that hang
    up after the first event."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        body = {"model": model, "prompt": rng.choice(prompts), "max_tokens": rng.randint(1, max_tokens),
                "temperature": 0 if rng.random() < 0.5 else 0.7, "seed": index, "stream": rng.random() < 0.5}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        draw = rng.random()
        if draw < malformed_share:
            kind = MALFORMED[index % len(MALFORMED)]
            requests.append(LoadRequest(_break(body, kind), malformed=kind))
        elif draw < malformed_share + hang_up_share:
            requests.append(LoadRequest({**body, "stream": True, "stream_options": {"include_usage": True},
                                         "max_tokens": max_tokens}, hang_up_after=1))
        else:
            requests.append(LoadRequest(body))
    return requests


def _break(body: dict, kind: str) -> dict:
    if kind == "negative max_tokens":
        return {**body, "max_tokens": -1}
    if kind == "no prompt":
        return {key: value for key, value in body.items() if key != "prompt"}
    if kind == "unknown model":
        return {**body, "model": "no-such-model"}
    return body  # "not json": the body is sent broken by send()


def send(port: int, request: LoadRequest, host: str = "127.0.0.1", timeout: float = 300) -> LoadResult:
    """Send one request and read its answer (all of a stream's events, or the first `hang_up_after` of them)."""
    start = time.perf_counter()
    payload = b'{"prompt": ' if request.malformed == "not json" else json.dumps(request.body).encode()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200 or not request.stream:
            data = json.loads(response.read() or b"{}")
            text, tokens = _text_and_tokens([data]) if response.status == 200 else (None, None)
            return LoadResult(response.status, text, tokens, time.perf_counter() - start)
        events = []
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            events.append(json.loads(line[len(b"data: "):]))
            if request.hang_up_after is not None and len(events) >= request.hang_up_after:
                return LoadResult(response.status, None, None, time.perf_counter() - start)
        text, tokens = _text_and_tokens(events)
        return LoadResult(response.status, text, tokens, time.perf_counter() - start)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
        return LoadResult(0, None, None, time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
    finally:
        connection.close()


def _text_and_tokens(events: list[dict]) -> tuple[str, int | None]:
    """The completion text of a response (or of a stream's events, joined) and its usage's completion tokens."""
    text = "".join(choice.get("text", "") for event in events for choice in event.get("choices", []))
    usages = [event["usage"] for event in events if event.get("usage")]
    return text, usages[-1]["completion_tokens"] if usages else None


def run_load(port: int, requests: Sequence[LoadRequest], concurrency: int, host: str = "127.0.0.1") -> list[LoadResult]:
    """Send `requests` from `concurrency` threads at once (each thread sends its next request as soon as it has an
    answer); the results come back in the order of `requests`."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda request: send(port, request, host), requests))


@dataclass(frozen=True)
class LoadSummary:
    """A load's outcome: requests sent and answered (status 200), refused (4xx), failed (5xx or no answer), the
    wall time, requests per second, and latency percentiles (seconds) of the answered requests."""

    requests: int
    answered: int
    refused: int
    failed: int
    seconds: float
    requests_per_second: float
    p50_seconds: float
    p99_seconds: float

    @classmethod
    def of(cls, results: Sequence[LoadResult], seconds: float) -> LoadSummary:
        latencies = sorted(result.seconds for result in results if result.status == 200)
        answered = len(latencies)
        refused = sum(400 <= result.status < 500 for result in results)
        return cls(requests=len(results), answered=answered, refused=refused,
                   failed=len(results) - answered - refused, seconds=seconds,
                   requests_per_second=len(results) / seconds if seconds else 0.0,
                   p50_seconds=statistics.median(latencies) if latencies else 0.0,
                   p99_seconds=latencies[min(answered - 1, round(0.99 * (answered - 1)))] if latencies else 0.0)
