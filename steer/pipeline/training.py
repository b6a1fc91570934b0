"""Step 4 of the method: train the correction head on the decision points of the pool's rollouts.

The objective (:mod:`steer.pipeline.objective`) is the ReasonMaxxer recipe's advantage-weighted contrastive loss,
restricted to the base top-k candidates. Training keeps the checkpoint with the best held-out gain, then chooses the
correction's strength the same way. It reads the cached features of `steer score`; it never runs the model."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from steer.files import atomic_write_json
from steer.head import (
    CorrectionHead,
    HeadMismatchError,
    embedding_fingerprint,
    fingerprints_match,
    output_embedding,
)
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.folders.scores import Features
from steer.pipeline.labels import LabelFolder
from steer.pipeline.objective import Points, branch_batch, decision_batch
from steer.pipeline.pool import Pool, resolve_tau, select_pool
from steer.settings import TrainSettings
from steer.version import __version__

TRAINING_FILE = "training.json"
GATE_WARNING = 0.10  # a head gating more of the training rollouts' steps than this steers far beyond decision points
# Fewer held-out problems than this and the kept checkpoint and strength move with the seed that drew them (on
# SmolLM2's pools of 4 to 8: step 10-140, scale 1-8; `benches/head_selection.py`).
HELDOUT_PROBLEMS_WARNING = 10


@dataclass(frozen=True)
class PoolRecord:
    """What the head learned from: pool `problems` and `rollouts`, decision points for training and held out, the
    held-out problems, each pool problem's pass rate, and the share of all generated positions that are decision
    points."""

    problems: int
    rollouts: int
    train_points: int
    heldout_points: int
    heldout_problems: list[str]
    pass_rates: dict[str, float]
    decision_fraction: float


@dataclass(frozen=True)
class TrainingRecord:
    """How a head was made, saved beside it as `training.json`.

    Attributes:
        steer (`str`): the library's version. model (`str`): the base model. data (`dict[str, str]`): the rollouts
            folder and content hashes of its rollouts and scores index.
        settings ([`TrainSettings`]). tau (`float`): the resolved decision threshold (nats). pool ([`PoolRecord`]).
        curve (`list[dict]`): per step: lr, loss, policy, kl, gain. heldout (`list[dict]`): the held-out evaluations.
        selected_step (`int`), scale (`float`), scale_gains (`dict[str, float]`): the checkpoint and strength kept.
        seconds (`float`): training time, loading included.
        warnings (`list[str]`): what a user should know before decoding with the head (see [`GATE_WARNING`] and
            [`HELDOUT_PROBLEMS_WARNING`]).
    """

    steer: str
    model: str
    data: dict[str, str]
    settings: TrainSettings
    tau: float
    pool: PoolRecord
    curve: list[dict]
    heldout: list[dict]
    selected_step: int
    scale: float
    scale_gains: dict[str, float]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def save(self, out_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(out_dir) / TRAINING_FILE, asdict(self))


@dataclass
class TrainResult:
    """A trained head (the held-out-best checkpoint) and the record of how it was made."""

    head: CorrectionHead
    record: TrainingRecord

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Save the head (safetensors and config) and `training.json` into `out_dir`."""
        self.head.save_pretrained(out_dir)
        self.record.save(out_dir)
        return Path(out_dir)


def train_head(
    model: PreTrainedModel,
    rollouts_dir: str | os.PathLike,
    settings: TrainSettings = TrainSettings(),
    *,
    progress: bool = True,
) -> TrainResult:
    """Train a correction head for `model` on the scored rollouts in `rollouts_dir`.

    Args:
        model (`PreTrainedModel`): the base model (only its output embedding is used).
        rollouts_dir (`str` or `os.PathLike`): a folder written by [`run_rollouts`] and [`score_rollouts`].
        settings ([`TrainSettings`]): pool, loss and optimiser settings.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        [`TrainResult`]; `result.save(dir)` writes it.

    Raises:
        [`NoContrastError`]: when no problem has both correct and incorrect rollouts.

    Example:

    ```python
    >>> result = train_head(model, "runs/r1", TrainSettings(tau_quantile=0.95))  # doctest: +SKIP
    >>> result.save("runs/r1/head")  # doctest: +SKIP
    ```
    """
    start = time.perf_counter()
    folder = RolloutFolder(rollouts_dir)
    pool = select_pool(folder.records(), settings.pool_problems, settings.keep_shortest, settings.advantage_clip)
    features = folder.scores.features(pool.keys)
    embedding = output_embedding(model).detach()
    if not fingerprints_match(features.embedding_fingerprint, embedding_fingerprint(embedding)):
        raise HeadMismatchError(f"{folder.path} was scored with another model than {model.name_or_path}")
    quantile = settings.tau_quantile if settings.tau is None else None
    tau = resolve_tau(features, settings.tau, quantile)
    if settings.labels == "branches":
        points = branch_batch(features, LabelFolder.of(folder.path).success(), tau, settings.top_k)
    else:
        points = decision_batch(features, pool.advantages, tau, settings.top_k)
    points = points.to(embedding.device)
    heldout_problems = _heldout_problems(pool, settings)
    in_heldout = torch.tensor([key[0] in heldout_problems for key in features.keys], device=embedding.device)
    train, heldout = points.select(~in_heldout[points.rollout]), points.select(in_heldout[points.rollout])
    if len(train) == 0:
        source = "labelled by `steer label` " if settings.labels == "branches" else ""
        raise ValueError(f"no decision point {source}above tau = {tau:.3f} nats in the training rollouts; lower tau")

    head = CorrectionHead.for_model(model, rank=settings.rank, top_k=settings.top_k, tau=tau, seed=settings.seed)
    head.config.tau_quantile = quantile
    fit = fit_head(head, train, heldout, embedding, settings, progress)
    scale_gains = choose_scale(head, heldout, embedding, settings)
    record = TrainingRecord(
        steer=__version__,
        model=model.name_or_path,
        data=_fingerprint_data(folder),
        settings=settings,
        tau=tau,
        pool=PoolRecord(
            problems=len(pool.pass_rates),
            rollouts=len(pool.advantages),
            train_points=len(train),
            heldout_points=len(heldout),
            heldout_problems=sorted(heldout_problems),
            pass_rates=pool.pass_rates,
            decision_fraction=len(points) / max(1, sum(e.numel() for e in features.entropy)),
        ),
        curve=fit.curve,
        heldout=fit.evaluations,
        selected_step=fit.selected_step,
        scale=head.scale,
        scale_gains=scale_gains,
        seconds=time.perf_counter() - start,
        warnings=gate_warnings(features, tau) + selection_warnings(len(heldout_problems), len(heldout)),
    )
    return TrainResult(head, record)


def gate_warnings(features: Features, tau: float) -> list[str]:
    """A warning when `tau` gates more than [`GATE_WARNING`] of the generated positions of the training rollouts."""
    share = float((torch.cat(features.entropy) > tau).float().mean())
    if share <= GATE_WARNING:
        return []
    return [f"tau = {tau:.3f} nats gates {share:.0%} of the generated positions of the training rollouts: the head "
            f"would steer far more than the few percent of steps that are decision points, which can make a model "
            f"worse; use a higher tau or --tau-quantile 0.95"]


def selection_warnings(problems: int, points: int) -> list[str]:
    """A warning when fewer than [`HELDOUT_PROBLEMS_WARNING`] held-out problems (`points` decision points among
    them) chose the checkpoint and strength."""
    if problems >= HELDOUT_PROBLEMS_WARNING:
        return []
    return [f"only {problems} held-out problems ({points} decision points) checked the checkpoint and strength "
            f"kept: on so few the choice is largely noise and moves with --seed (with none, the last step and x1 are "
            f"kept untested); roll out more problems, so that more have both right and wrong rollouts, or raise "
            f"--heldout-fraction"]


def _heldout_problems(pool: Pool, settings: TrainSettings) -> set[str]:
    problems = sorted(pool.pass_rates)
    count = min(len(problems) - 1, round(settings.heldout_fraction * len(problems)))
    generator = torch.Generator().manual_seed(settings.seed)
    return {problems[i] for i in torch.randperm(len(problems), generator=generator)[: max(0, count)].tolist()}


def _schedule(step: int, settings: TrainSettings) -> float:
    """Learning-rate multiplier: linear warm-up, then linear decay to zero at the last step."""
    warmup = min(settings.warmup_steps, settings.steps - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))


@dataclass
class Fit:
    """How [`fit_head`] went: the training `curve` (one entry per step), the held-out `evaluations`, and the step
    whose weights the head now holds."""

    curve: list[dict]
    evaluations: list[dict]
    selected_step: int


def fit_head(
    head: CorrectionHead,
    train: Points,
    heldout: Points,
    embedding: torch.Tensor,
    settings: TrainSettings = TrainSettings(),
    progress: bool = False,
) -> Fit:
    """Optimise `head` on the `train` decision points with AdamW, evaluating on `heldout` every
    `settings.eval_every` steps, and leave it holding the weights with the best held-out gain (the last weights
    when `heldout` is empty).

    Args:
        head ([`CorrectionHead`]): the head to train (in place).
        train ([`Points`]), heldout ([`Points`]): see [`decision_batch`] and [`branch_batch`].
        embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the model's output embedding.
        settings ([`TrainSettings`]): loss and optimiser settings (the pool settings are not used here).
        progress (`bool`, defaults to `False`): show a progress bar.
    """
    head.to(embedding.device).train()
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _schedule(step, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    rollouts = train.rollout.unique()
    curve, evaluations = [], []
    best = {"step": 0, "gain": -math.inf, "state": copy.deepcopy(head.state_dict())}
    for step in tqdm(range(1, settings.steps + 1), disable=not progress, desc="training", unit="step"):
        chosen = rollouts[torch.randperm(len(rollouts), generator=generator)[: settings.rollouts_per_step]]
        batch = train.select(torch.isin(train.rollout, chosen.to(train.rollout.device)))
        parts = batch.loss(head, embedding, settings.kl_weight, settings.objective)
        optimiser.zero_grad()
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), settings.grad_clip)
        optimiser.step()
        scheduler.step()
        values = {name: float(value.detach()) for name, value in parts.items()}
        curve.append({"step": step, "lr": scheduler.get_last_lr()[0], **values})
        if len(heldout) and (step % settings.eval_every == 0 or step == settings.steps):
            evaluation = _evaluate(head, heldout, embedding, settings)
            evaluations.append({"step": step, **evaluation})
            if evaluation["gain"] > best["gain"]:
                best = {"step": step, "gain": evaluation["gain"], "state": copy.deepcopy(head.state_dict())}
    if not len(heldout):
        best = {"step": settings.steps, "gain": math.nan, "state": copy.deepcopy(head.state_dict())}
    head.load_state_dict(best["state"])
    head.eval()
    return Fit(curve, evaluations, best["step"])


def choose_scale(
    head: CorrectionHead, heldout: Points, embedding: torch.Tensor, settings: TrainSettings
) -> dict[str, float]:
    """Set `head.scale` to the strength in `settings.scales` with the best held-out gain (the smallest of equals;
    1.0 when there are no held-out points) and return the gain of each strength tried."""
    if not len(heldout):
        head.scale = 1.0
        return {}
    gains = {}
    for scale in sorted(settings.scales):
        head.scale = scale
        gains[scale] = _evaluate(head, heldout, embedding, settings)["gain"]
    head.scale = max(gains, key=lambda scale: gains[scale])
    return {str(scale): gain for scale, gain in gains.items()}


@torch.no_grad()
def _evaluate(head: CorrectionHead, heldout: Points, embedding: torch.Tensor, settings: TrainSettings) -> dict:
    parts = heldout.loss(head, embedding, settings.kl_weight, settings.objective)
    return {name: float(value) for name, value in parts.items()}


def _fingerprint_data(folder: RolloutFolder) -> dict[str, str]:
    """Content hashes of the rollouts and the scores index, so a head names exactly the data it learned from."""
    return {
        "rollouts_dir": str(folder.path),
        "rollouts_sha256": _sha256(folder.records_path),
        "scores_sha256": _sha256(folder.scores.records_path),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
