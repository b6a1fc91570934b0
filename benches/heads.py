"""The method on a real model, as the paper tables run it: rollouts, scoring, branch labels, and two heads (rollout
advantages, branch labels), with what each head cost.

Used by `benches/paper_table_real.py`. Every stage resumes in its folder, and its wall seconds are summed over the
sittings that ran it (`stages.json`, written every `HEARTBEAT_SECONDS` while a stage runs, so a sitting killed
mid-stage loses at most that much of its time), so a rerun reports what the stages cost, not the nothing a resumed
run does.

Compute is counted as GRPO's is (`benches/grpo.py`): 2N FLOPs per token a forward pass reads or generates (N the
model's parameters): the rollouts' prompt and completion tokens, the same again for their teacher-forced scoring, and
the prompt and completion tokens of every branch continuation of the labels; plus an upper bound on head training, 6
FLOPs per head parameter, training decision point and step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.pipeline.decoding import Decoder
from steer.pipeline.folders.labels import LabelFolder
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutRecord, sequence_length
from steer.pipeline.labels import label_branches
from steer.pipeline.metrics import Estimate
from steer.pipeline.problems import Problem
from steer.pipeline.rollout import run_rollouts
from steer.pipeline.scoring import score_rollouts
from steer.pipeline.training import TRAINING_FILE, select_checkpoint, train_head
from steer.settings import LabelSettings, RolloutSettings, ScoreSettings, TrainSettings

T = TypeVar("T")
STAGES_FILE = "stages.json"
HEARTBEAT_SECONDS = 30.0  # how often a running stage writes its seconds so far
LABEL_SOURCES = {"advantage head": "advantage", "branch head": "branches"}


@dataclass(frozen=True)
class HeadRun:
    """A trained head and what making it cost: `seconds` (its stages' wall time), `tokens` (tokens read or generated
    by the model) and `flops`."""

    name: str
    path: Path
    head: CorrectionHead
    seconds: float
    tokens: int
    flops: float


class Stages:
    """Wall seconds per stage in `<out>/stages.json`, summed over the sittings that ran it: while a stage runs, its
    seconds so far are written every `HEARTBEAT_SECONDS` (`"done": false`); a stage marked done is not timed again."""

    def __init__(self, out: Path) -> None:
        self.path = out / STAGES_FILE
        self.record: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, stage: Callable[[], T]) -> T | None:
        """Run `stage` and time it, unless it is done (then nothing runs: a finished stage's folder is complete, and
        the engine that made it may not be the one at hand)."""
        entry = self.record.get(name, {})
        if entry.get("done"):
            return None
        prior, sittings = entry.get("seconds", 0.0), entry.get("sittings", 0) + 1
        start, stop = time.perf_counter(), threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                self._write(name, prior + time.perf_counter() - start, sittings, done=False)

        heartbeat = threading.Thread(target=beat, daemon=True)
        heartbeat.start()
        try:
            result = stage()
        finally:
            stop.set()
            heartbeat.join()
        self._write(name, prior + time.perf_counter() - start, sittings, done=True)
        return result

    def _write(self, name: str, seconds: float, sittings: int, done: bool) -> None:
        self.record[name] = {"seconds": seconds, "sittings": sittings, "done": done}
        atomic_write_json(self.path, self.record)

    def seconds(self, *names: str) -> float:
        return sum(self.record[name]["seconds"] for name in names)


def make_heads(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], out: Path,
               rollouts: RolloutSettings, labels: LabelSettings | None, train: TrainSettings = TrainSettings(),
               score: ScoreSettings = ScoreSettings(), decoder: Decoder | None = None) -> dict[str, HeadRun]:
    """Rollouts of `model` on `problems`, scored, the advantage head, then branch labels and the branch head (`train`
    otherwise the same), saved under `out`; with `labels=None` it stops after the advantage head (the labels and
    the branch head come in a later call). Rollouts and branch continuations decode with `decoder` where one is
    given (vLLM's, say), else with `model`; scoring and training use `model`. Returns the heads made so far by name
    ([`LABEL_SOURCES`])."""
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    rollouts_dir = out / "rollouts"
    engine = decoder if decoder is not None else model
    stages.run("rollouts", lambda: run_rollouts(engine, tokenizer, problems, rollouts_dir, rollouts))
    stages.run("scoring", lambda: score_rollouts(model, rollouts_dir, score))
    for name, source in LABEL_SOURCES.items():
        if source == "branches":
            if labels is None:
                break
            stages.run("labels", lambda: label_branches(engine, tokenizer, rollouts_dir, labels))
        folder = out / name.replace(" ", "-")
        if not (folder / TRAINING_FILE).exists():
            stages.record.pop(f"train {source}", None)  # a head not saved was not trained: time it again
            stages.run(f"train {source}", lambda s=source, f=folder: train_head(model, rollouts_dir,
                                                                                 replace(train, labels=s)).save(f))
    return head_runs(out, sum(p.numel() for p in model.parameters()), train.steps)


def head_runs(out: Path, parameters: int, steps: int = TrainSettings.steps) -> dict[str, HeadRun]:
    """The heads [`make_heads`] made under `out` so far, with what each cost (read from the folders: nothing runs),
    for a model of `parameters` parameters whose heads trained `steps` steps."""
    stages = Stages(out)
    rollouts_dir = out / "rollouts"
    records = RolloutFolder(rollouts_dir).read_records()
    rollout_tokens = sum(map(sequence_length, records))
    heads = {}
    for name, source in LABEL_SOURCES.items():
        folder = out / name.replace(" ", "-")
        if not (folder / TRAINING_FILE).exists():
            continue
        head = CorrectionHead.from_pretrained(folder)
        points = json.loads((folder / TRAINING_FILE).read_text())["pool"]["train_points"]
        training_flops = 6 * sum(p.numel() for p in head.parameters()) * points * steps
        tokens = 2 * rollout_tokens + (label_tokens(rollouts_dir, records) if source == "branches" else 0)
        stage_names = ["rollouts", "scoring", *(["labels"] if source == "branches" else []), f"train {source}"]
        heads[name] = HeadRun(name, folder, head, stages.seconds(*stage_names), tokens,
                              2 * parameters * tokens + training_flops)
    return heads


@dataclass(frozen=True)
class RolloutStatistics:
    """What the rollouts under a run hold: how many, their mean reward, the problems with both right and wrong
    rollouts (what a pool draws from), the fraction cut by the token budget, and the median completion length."""

    rollouts: int
    problems: int
    mean_reward: float
    mixed_problems: int
    truncated: float
    median_tokens: float

    @classmethod
    def of(cls, out: Path) -> RolloutStatistics:
        records = RolloutFolder(out / "rollouts").read_records()
        rewards: dict[str, list[float]] = {}
        for r in records:
            rewards.setdefault(r.problem_id, []).append(r.reward)
        lengths = sorted(len(r.completion_ids) for r in records)
        return cls(rollouts=len(records), problems=len(rewards),
                   mean_reward=sum(r.reward for r in records) / len(records),
                   mixed_problems=sum(0 < sum(v) < len(v) for v in rewards.values()),
                   truncated=sum(r.finish_reason == "length" for r in records) / len(records),
                   median_tokens=float(lengths[len(lengths) // 2]))


@dataclass(frozen=True)
class HeldOutCurve:
    """A head's training read on its held-out problems: their count and decision points, the policy loss of the
    untrained head (the base model's), the step and loss where it was lowest, the step and strength selection kept
    and the loss there, and the loss at the last step. A head that generalises has a best loss below the base's.
    `null_margin` is the margin the head was selected with (`None` for heads trained before it existed, which the
    one-standard-error rule alone chose), and `kept_by_null_margin` the step the library's rule (its default margin
    where none was recorded) keeps from the same curve: the kept head's step, or 0 (the untrained head, which decodes
    as the base model)."""

    problems: int
    points: int
    base_loss: float
    best_step: int
    best_loss: float
    selected_step: int
    selected_loss: float
    scale: float
    last_loss: float
    null_margin: float | None
    kept_by_null_margin: int

    @classmethod
    def of(cls, folder: Path) -> HeldOutCurve:
        training = json.loads((folder / TRAINING_FILE).read_text())
        if not training["heldout"]:
            raise ValueError(f"{folder} was trained with no held-out problems: it has no held-out curve")
        curve = {e["step"]: e["policy"] for e in training["heldout"]}
        best = min(curve, key=curve.__getitem__)
        selected = training["selected_step"]
        margin = training["settings"].get("null_margin")
        gains = [Estimate(e["gain"], e["gain_se"]) for e in training["heldout"]]
        rule = TrainSettings.null_margin if margin is None else margin
        kept = training["heldout"][select_checkpoint(gains, len(training["pool"]["heldout_problems"]), rule)]["step"]
        return cls(problems=len(training["pool"]["heldout_problems"]), points=training["pool"]["heldout_points"],
                   base_loss=curve[0], best_step=best, best_loss=curve[best], selected_step=selected,
                   selected_loss=curve[selected], scale=training["scale"], last_loss=curve[max(curve)],
                   null_margin=margin, kept_by_null_margin=kept)


def rollout_cost(out: Path, parameters: int) -> tuple[float, int, float]:
    """What the rollouts and their scoring under `out` cost, which every method trained on them shares: seconds,
    tokens (generated, then scored) and FLOPs."""
    tokens = 2 * sum(map(sequence_length, RolloutFolder(out / "rollouts").read_records()))
    return Stages(out).seconds("rollouts", "scoring"), tokens, 2.0 * parameters * tokens


def label_tokens(rollouts_dir: Path, records: Sequence[RolloutRecord]) -> int:
    """Prompt and completion tokens of every branch continuation of the labels (all read or generated)."""
    prompts = {r.key: r.prompt_ids for r in records}
    return sum(len(prompts[r.problem_id, r.sample]) + len(r.completion_ids)
               for r in LabelFolder.of(rollouts_dir).read_records())
