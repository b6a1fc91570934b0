"""The evaluation folder: graded decodes of benchmark problems, one record per (benchmark, problem, arm, sample),
and their summary.

Layout of an evaluation folder `DIR`:

- `predictions.jsonl`: the records ([`PredictionRecord`]), appended as batches finish, so an interrupted run resumes;
- `eval.settings.json`: the arms, decoding settings and problems (a resumed run must use the same);
- `summary.json`: the [`EvalSummary`] of all records, written at the end of a run;
- `traces/trace-*.safetensors` (only with `steer eval --trace`): per-step traces of the records' decodes
  ([`StepTrace`]), one shard per batch and arm, tensors named as in [`TRACE_TENSORS`], sequences concatenated. Its
  metadata ([`TRACE_METADATA`]) names the records it holds and the text of every token it refers to, so a folder
  can be viewed without its model. A shard is written atomically, before its batch's records are appended, and is
  named by the keys it holds, so that a resumed run rewrites a batch's shard rather than adding a second one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steer.errors import SteerError
from steer.files import atomic_write_json
from steer.pipeline.folders import Record, RunFolder
from steer.pipeline.summary import EvalSummary

RECORDS_FILE = "predictions.jsonl"
SETTINGS_FILE = "eval.settings.json"
SUMMARY_FILE = "summary.json"
TRACES_DIR = "traces"
TRACE_FORMAT = "steer-trace-1"
KEY = ("benchmark", "problem_id", "arm", "sample")
TRACE_TENSORS = {
    "offsets": "[sequences + 1] int64: where each sequence's steps start",
    "tokens": "[steps] int32: the generated token",
    "entropy": "[steps] float32: base entropy (nats), the quantity the steering gate reads",
    "flags": "[steps] uint8: bit 0 gated, bit 1 changed the top-1",
    "topk_ids": "[steps, k] int32: the base top-k candidates, best first",
    "base_probs": "[steps, k] float16: their base probabilities",
    "steered_probs": "[steps, k] float16: their probabilities after the arm's processor",
}
TRACE_METADATA = {
    "format": f"{TRACE_FORMAT!r}",
    "keys": "JSON list of the record keys (KEY), one per sequence, in order",
    "questions": "JSON list of the problems' questions, one per sequence",
    "tokens": "JSON object: token id -> its text, for every id in `tokens` and `topk_ids`",
    "tau": "JSON number or null: the gate's threshold (nats) for this arm",
}


@dataclass(frozen=True)
class PredictionRecord(Record):
    """One graded decode of a benchmark problem.

    Attributes:
        benchmark (`str`): the benchmark's label. problem_id (`str`).
        arm (`str`): how it was decoded (`"base"`, `"steered"`, or another arm's name).
        sample (`int`): the decode's index among the problem's decodes in this arm.
        completion (`str`): the generated text. answer (`str`, *optional*): the answer extracted from it.
        gold (`str`): the gold answer. correct (`bool`).
        finish_reason (`str`): `"stop"` or `"length"`. steps (`int`): generated tokens.
        gated (`int`): steps where the arm's processor acted (0 without one); changed (`int`): gated steps where that
            changed the top-1 token.
    """

    benchmark: str
    problem_id: str
    arm: str
    sample: int
    completion: str
    answer: str | None
    gold: str
    correct: bool
    finish_reason: str
    steps: int
    gated: int
    changed: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.benchmark, self.problem_id, self.arm, self.sample


@dataclass(frozen=True)
class StepTrace:
    """The trace of one decoded sequence: one entry per generated token.

    Attributes:
        tokens (`torch.IntTensor` of shape `(steps,)`): the generated tokens.
        entropy (`torch.FloatTensor` of shape `(steps,)`): entropy (nats) of the scores the processor was handed.
        gated (`torch.BoolTensor` of shape `(steps,)`): steps where the wrapped processor acted (decision points).
        changed (`torch.BoolTensor` of shape `(steps,)`): gated steps where that changed the top-1 token.
        topk_ids (`torch.IntTensor` of shape `(steps, k)`): the base top-k candidates, best first.
        base_probs (`torch.HalfTensor` of shape `(steps, k)`): their probabilities under the base distribution.
        steered_probs (`torch.HalfTensor` of shape `(steps, k)`): their probabilities after the wrapped processor
            (equal to `base_probs` without one).
    """

    tokens: torch.Tensor
    entropy: torch.Tensor
    gated: torch.Tensor
    changed: torch.Tensor
    topk_ids: torch.Tensor
    base_probs: torch.Tensor
    steered_probs: torch.Tensor

    @property
    def steps(self) -> int:
        return self.tokens.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[-1]


class TraceError(SteerError, ValueError):
    """An evaluation folder has no traces, or a damaged trace shard."""


@dataclass(frozen=True)
class RecordedTrace:
    """The trace of one record's decode, as read back from the folder.

    Attributes:
        trace ([`StepTrace`]): the per-step trace.
        question (`str`): the problem's question.
        tau (`float`, *optional*): the arm's gate threshold (`None` for an arm without a head).
    """

    trace: StepTrace
    question: str
    tau: float | None


@dataclass(frozen=True)
class FolderTraces:
    """Every trace of an evaluation folder.

    Attributes:
        by_key (`dict[tuple, RecordedTrace]`): by record key ([`KEY`]).
        tokens (`dict[int, str]`): the text of every token the traces refer to.
    """

    by_key: dict[tuple, RecordedTrace]
    tokens: dict[int, str]


class PredictionFolder(RunFolder[PredictionRecord]):
    """An evaluation folder (see the module docstring).

    Args:
        path (`str` or `os.PathLike`): the folder.

    Example:

    ```python
    >>> summary = PredictionFolder("runs/eval").summary()  # doctest: +SKIP
    >>> summary.benchmarks["gsm8k"].arms["steered"].accuracy  # doctest: +SKIP
    ```
    """

    records_file = RECORDS_FILE
    settings_file = SETTINGS_FILE
    record_type = PredictionRecord
    key = KEY
    writer = "steer eval"

    def records(self, arm: str | None = None) -> list[PredictionRecord]:
        """The records (of one `arm`, or all), in file order."""
        return [r for r in self.read_records() if arm is None or r.arm == arm]

    @property
    def traces_path(self) -> Path:
        return self.path / TRACES_DIR

    def write_traces(self, keys: Sequence[tuple], traces: Sequence[StepTrace], questions: Sequence[str],
                     tokens: dict[int, str], tau: float | None) -> Path:
        """Save the traces of one batch of one arm as a shard (see [`TRACE_TENSORS`], [`TRACE_METADATA`]),
        atomically, under a name derived from `keys`; returns its path."""
        if not len(keys) == len(traces) == len(questions):
            raise ValueError(f"{len(keys)} keys, {len(traces)} traces and {len(questions)} questions")
        if len({trace.top_k for trace in traces}) > 1:
            raise ValueError("the traces of one shard must record the same number of candidates")
        steps = [trace.steps for trace in traces]
        tensors = {
            "offsets": torch.tensor([0, *steps], dtype=torch.int64).cumsum(0),
            "tokens": torch.cat([t.tokens for t in traces]).int(),
            "entropy": torch.cat([t.entropy for t in traces]).float(),
            "flags": torch.cat([t.gated.to(torch.uint8) | (t.changed.to(torch.uint8) << 1) for t in traces]),
            "topk_ids": torch.cat([t.topk_ids for t in traces]).int(),
            "base_probs": torch.cat([t.base_probs for t in traces]).half(),
            "steered_probs": torch.cat([t.steered_probs for t in traces]).half(),
        }
        metadata = {
            "format": TRACE_FORMAT, "keys": json.dumps([list(key) for key in keys]),
            "questions": json.dumps(list(questions), ensure_ascii=False),
            "tokens": json.dumps({str(token): text for token, text in tokens.items()}, ensure_ascii=False),
            "tau": json.dumps(tau),
        }
        digest = hashlib.sha256(json.dumps([list(key) for key in keys]).encode()).hexdigest()[:20]
        path = self.traces_path / f"trace-{digest}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp), metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def traces(self) -> FolderTraces:
        """Every stored trace, by record key (a key in several shards, from a resumed batch, is read once).

        Raises:
            [`TraceError`]: the folder has no traces, or a shard is damaged (naming it).
        """
        shards = sorted(self.traces_path.glob("trace-*.safetensors"))
        if not shards:
            raise TraceError(f"{self.path} has no traces ({self.traces_path} is empty or missing): run `steer eval "
                             "--trace` into it (a finished run resumes and records the traces of new decodes only)")
        by_key: dict[tuple, RecordedTrace] = {}
        tokens: dict[int, str] = {}
        for shard in shards:
            by_key.update(_read_shard(shard, tokens))
        return FolderTraces(by_key, tokens)

    def write_summary(self, summary: EvalSummary) -> None:
        atomic_write_json(self.path / SUMMARY_FILE, summary.to_json())

    def summary(self) -> EvalSummary:
        """The summary written by the last complete run."""
        return EvalSummary.from_json(json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8")))


def _read_shard(path: Path, tokens: dict[int, str]) -> dict[tuple, RecordedTrace]:
    """The traces of one shard by key; adds its token texts to `tokens`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != TRACE_FORMAT:
                raise TraceError(f"{path}: not a trace shard of format {TRACE_FORMAT!r}")
            tensors = {name: handle.get_tensor(name) for name in TRACE_TENSORS}
        keys = json.loads(metadata["keys"])
        questions = json.loads(metadata["questions"])
        tau = json.loads(metadata["tau"])
        tokens.update({int(token): text for token, text in json.loads(metadata["tokens"]).items()})
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise TraceError(f"{path}: damaged trace shard ({type(err).__name__}: {err})") from None
    offsets = tensors["offsets"].tolist()
    if len(offsets) != len(keys) + 1 or len(questions) != len(keys):
        raise TraceError(f"{path}: {len(keys)} keys for {len(offsets) - 1} sequences")
    flags = tensors["flags"]
    traces = {}
    for index, key in enumerate(keys):
        part = slice(offsets[index], offsets[index + 1])
        trace = StepTrace(
            tokens=tensors["tokens"][part], entropy=tensors["entropy"][part], gated=(flags[part] & 1).bool(),
            changed=(flags[part] & 2).bool(), topk_ids=tensors["topk_ids"][part],
            base_probs=tensors["base_probs"][part], steered_probs=tensors["steered_probs"][part],
        )
        traces[tuple(key)] = RecordedTrace(trace, questions[index], tau)
    return traces
