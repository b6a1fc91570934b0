"""Step 4 of the method: train the correction head on the decision points of the pool's rollouts.

The objective (:mod:`steer.pipeline.objective`) is the ReasonMaxxer recipe's advantage-weighted contrastive loss,
restricted to the base top-k candidates. The checkpoint, then the correction's strength, are chosen on held-out
problems by the one-standard-error rule ([`select_within_one_se`]): the earliest checkpoint whose held-out gain is
within one standard error of the best, and then the smallest such strength. The untrained head, which changes
nothing, is kept unless the best held-out gain is `null_margin` (2) standard errors above zero. It reads the cached
features of `steer score`; it never runs the model."""

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
from steer.pipeline.folders.labels import LabelFolder
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.folders.scores import Features
from steer.pipeline.metrics import Estimate, select_within_one_se
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
class CurvePoint:
    """One training step: the learning rate, and the batch's loss, its parts and gain (see [`Losses`])."""

    step: int
    lr: float
    loss: float
    policy: float
    kl: float
    gain: float


@dataclass(frozen=True)
class HeldoutEvaluation:
    """The head on the held-out points at one step: loss and parts (means over points), and the gain over held-out
    problems with its standard error (see [`Estimate`])."""

    step: int
    loss: float
    policy: float
    kl: float
    gain: float
    gain_se: float

    @property
    def held_out_gain(self) -> Estimate:
        return Estimate(self.gain, self.gain_se)


@dataclass(frozen=True)
class TrainingRecord:
    """How a head was made, saved beside it as `training.json`.

    Attributes:
        steer (`str`): the library's version. model (`str`): the base model. data (`dict[str, str]`): the rollouts
            folder and content hashes of its rollouts and scores index (and of its labels, for a head trained on
            branch labels).
        settings ([`TrainSettings`]). tau (`float`): the resolved decision threshold (nats). pool ([`PoolRecord`]).
        curve (`list[CurvePoint]`): per training step. heldout (`list[HeldoutEvaluation]`): the held-out evaluations
            (step 0 is the untrained head).
        selected_step (`int`), scale (`float`): the checkpoint (0: the untrained head) and strength kept.
        scale_gains (`dict[str, float]`), scale_gain_errors (`dict[str, float]`): the held-out gain of each strength
            tried at the kept checkpoint, and its standard error over held-out problems.
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
    curve: list[CurvePoint]
    heldout: list[HeldoutEvaluation]
    selected_step: int
    scale: float
    scale_gains: dict[str, float]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    scale_gain_errors: dict[str, float] = field(default_factory=dict)

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
    pool = select_pool(folder.read_records(), settings.pool_problems, settings.keep_shortest, settings.advantage_clip)
    features = folder.scores.features(pool.keys)
    embedding = output_embedding(model).detach()
    if not fingerprints_match(features.embedding_fingerprint, embedding_fingerprint(embedding)):
        raise HeadMismatchError(f"{folder.path} was scored with another model than {model.name_or_path}")
    tau = resolve_tau(settings, torch.cat(features.entropy), features.floor)
    if settings.labels == "branches":
        points = branch_batch(features, LabelFolder.of(folder.path).success(), tau, settings.top_k)
    else:
        points = decision_batch(features, pool.advantages, tau, settings.top_k, settings.objective)
    points = points.to(embedding.device)
    heldout_problems = _heldout_problems(pool, settings)
    in_heldout = torch.tensor([key[0] in heldout_problems for key in features.keys], device=embedding.device)
    train, heldout = points.select(~in_heldout[points.rollout]), points.select(in_heldout[points.rollout])
    problem_ids = sorted({key[0] for key in features.keys})
    rollout_problem = torch.tensor([problem_ids.index(key[0]) for key in features.keys], device=embedding.device)
    heldout_groups = rollout_problem[heldout.rollout] if len(heldout) else torch.zeros(0, dtype=torch.long)
    if len(train) == 0:
        source = "labelled by `steer label` " if settings.labels == "branches" else ""
        raise ValueError(f"no decision point {source}above tau = {tau:.3f} nats in the training rollouts; lower tau")

    head = CorrectionHead.for_model(model, rank=settings.rank, top_k=settings.top_k, tau=tau, seed=settings.seed)
    head.config.tau_quantile = settings.quantile
    fit = fit_head(head, train, heldout, embedding, settings, progress, heldout_groups)
    scale_gains = choose_scale(head, heldout, embedding, settings, heldout_groups)
    record = TrainingRecord(
        steer=__version__,
        model=model.name_or_path,
        data=_fingerprint_data(folder, settings.labels == "branches"),
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
        scale_gains={str(scale): gain.mean for scale, gain in scale_gains.items()},
        scale_gain_errors={str(scale): gain.standard_error for scale, gain in scale_gains.items()},
        seconds=time.perf_counter() - start,
        warnings=(gate_warnings(features, tau) + selection_warnings(len(heldout_problems), len(heldout))
                  + untrained_warnings(fit.selected_step, len(heldout), settings.null_margin)),
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


def untrained_warnings(selected_step: int, heldout_points: int, null_margin: float) -> list[str]:
    """A warning when selection kept the untrained head (step 0)."""
    if selected_step > 0 or heldout_points == 0:
        return []
    return [f"the best held-out gain was not {null_margin:g} standard errors above that of the untrained head (or "
            "fewer than two held-out problems gave no standard error), which changes nothing: the head keeps its "
            "untrained weights and decodes as the base model (more rollouts, more held-out problems or branch labels "
            "may give it a signal to learn)"]


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
    """How [`fit_head`] went: the training `curve` (one entry per step), the held-out `evaluations` (step 0 is the
    untrained head) with the head's weights at each (`states`), and the step whose weights the head now holds."""

    curve: list[CurvePoint]
    evaluations: list[HeldoutEvaluation]
    selected_step: int
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)


def fit_head(
    head: CorrectionHead,
    train: Points,
    heldout: Points,
    embedding: torch.Tensor,
    settings: TrainSettings = TrainSettings(),
    progress: bool = False,
    heldout_groups: torch.Tensor | None = None,
) -> Fit:
    """Optimise `head` on the `train` decision points with AdamW, evaluating on `heldout` before training and every
    `settings.eval_every` steps, and leave it holding the weights that [`select_within_one_se`] chooses (the last
    weights when `heldout` is empty).

    Args:
        head ([`CorrectionHead`]): the head to train (in place).
        train ([`Points`]), heldout ([`Points`]): see [`decision_batch`] and [`branch_batch`].
        embedding (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the model's output embedding.
        settings ([`TrainSettings`]): optimiser settings and the anchor's weight (the pool settings are not used
            here, nor the objective: the points carry theirs, see [`decision_batch`]).
        progress (`bool`, defaults to `False`): show a progress bar.
        heldout_groups (`torch.LongTensor` of shape `(len(heldout),)`, *optional*): the problem of each held-out
            point, over which standard errors are taken (defaults to each point its own problem).
    """
    head.to(embedding.device).train()
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _schedule(step, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    rollouts = train.rollout.unique()
    curve: list[CurvePoint] = []
    evaluations: list[HeldoutEvaluation] = []
    states: list[dict[str, torch.Tensor]] = []

    def checkpoint(step: int) -> None:
        evaluations.append(_evaluate(head, heldout, embedding, settings, heldout_groups, step))
        states.append(copy.deepcopy(head.state_dict()))

    if len(heldout):
        checkpoint(0)
    for step in tqdm(range(1, settings.steps + 1), disable=not progress, desc="training", unit="step"):
        chosen = rollouts[torch.randperm(len(rollouts), generator=generator)[: settings.rollouts_per_step]]
        batch = train.select(torch.isin(train.rollout, chosen.to(train.rollout.device)))
        losses = batch.loss(head, embedding, settings.kl_weight)
        optimiser.zero_grad()
        losses.loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), settings.grad_clip)
        optimiser.step()
        scheduler.step()
        curve.append(CurvePoint(step, scheduler.get_last_lr()[0], float(losses.loss.detach()),
                                float(losses.policy.detach()), float(losses.kl.detach()), float(losses.gain.detach())))
        if len(heldout) and (step % settings.eval_every == 0 or step == settings.steps):
            checkpoint(step)
    head.eval()
    if not len(heldout):
        return Fit(curve, evaluations, settings.steps)
    problems = len(heldout) if heldout_groups is None else int(heldout_groups.unique().numel())
    chosen = select_checkpoint([e.held_out_gain for e in evaluations], problems, settings.null_margin)
    head.load_state_dict(states[chosen])
    return Fit(curve, evaluations, evaluations[chosen].step, states)


def select_checkpoint(gains: list[Estimate], problems: int, null_margin: float) -> int:
    """The index of the checkpoint kept from its held-out `gains` over `problems` held-out problems (index 0: the
    untrained head): [`select_within_one_se`] with `null_margin`; with fewer than two problems there is no standard
    error, so nothing clears the margin and the untrained head is kept."""
    return select_within_one_se(gains, null_margin) if problems > 1 else 0


def choose_scale(
    head: CorrectionHead, heldout: Points, embedding: torch.Tensor, settings: TrainSettings,
    heldout_groups: torch.Tensor | None = None,
) -> dict[float, Estimate]:
    """Set `head.scale` to the smallest strength in `settings.scales` whose held-out gain is within one standard
    error of the best ([`select_within_one_se`]; 1.0 when there are no held-out points) and return the held-out
    gain of each strength tried (`heldout_groups` as for [`fit_head`])."""
    if not len(heldout):
        head.scale = 1.0
        return {}
    gains = {}
    for scale in sorted(settings.scales):
        head.scale = scale
        gains[scale] = _evaluate(head, heldout, embedding, settings, heldout_groups).held_out_gain
    head.scale = list(gains)[select_within_one_se(list(gains.values()))]
    return gains


@torch.no_grad()
def _evaluate(head: CorrectionHead, heldout: Points, embedding: torch.Tensor, settings: TrainSettings,
              groups: torch.Tensor | None, step: int = 0) -> HeldoutEvaluation:
    """The head on the held-out points (see [`HeldoutEvaluation`])."""
    losses = heldout.loss(head, embedding, settings.kl_weight)
    gain = problem_gain(losses.point_gain, groups)
    return HeldoutEvaluation(step, float(losses.loss), float(losses.policy), float(losses.kl), gain.mean,
                             gain.standard_error)


def problem_gain(point_gain: torch.Tensor, groups: torch.Tensor | None) -> Estimate:
    """[`Estimate`] of per-point gains grouped by problem (`groups[i]` the problem of point i; `None`: each point
    its own problem)."""
    if groups is None:
        groups = torch.arange(len(point_gain), device=point_gain.device)
    _, index = groups.unique(return_inverse=True)
    count = int(index.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64, device=point_gain.device).index_add_(0, index, point_gain.double())
    sizes = torch.bincount(index, minlength=count).double()
    means = sums / sizes
    error = float(means.std() / math.sqrt(count)) if count > 1 else 0.0
    return Estimate(float(means.mean()), error)


def _fingerprint_data(folder: RolloutFolder, branch_labels: bool) -> dict[str, str]:
    """Content hashes of the rollouts, the scores index and, for a head trained on branch labels, the labels, so a
    head names exactly the data it learned from."""
    data = {
        "rollouts_dir": str(folder.path),
        "rollouts_sha256": _sha256(folder.records_path),
        "scores_sha256": _sha256(folder.scores.records_path),
    }
    if branch_labels:
        data["labels_sha256"] = _sha256(LabelFolder.of(folder.path).records_path)
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
