"""Step 4 of the method: train the correction head with an advantage-weighted contrastive loss at decision points.

At each decision point t (base entropy > tau) of a pool rollout with advantage A, the candidate set C is the base
top-k plus the token the rollout took, y_t, if it is outside. The head adds `delta_j` to the top-k candidates (as
it will when decoding; a y_t outside the top-k is not adjusted, only renormalised against), giving the steered
candidate distribution q over C; p is the base distribution over C. The recipe's loss (`objective="recipe"`) is

    mean_t [ -A log q(y_t) ] + kl_weight * mean_t KL(p || q)

so choices of better-than-average rollouts are pushed up, those of worse ones down, and the anchor keeps q near p.
Its push-down term has no floor (log q -> -inf), so a head can grow without bound chasing it. The default
(`objective="unlikelihood"`) pushes worse-than-average choices down through log(1 - q(y_t)) instead, which stops
at q = 0:

    mean_t [ -A log q(y_t)  if A >= 0  else  A log(1 - q(y_t)) ] + kl_weight * mean_t KL(p || q)

The checkpoint kept is the one with the best held-out `gain`, mean_t A (q(y_t) / p(y_t) - 1): a bounded,
importance-weighted estimate of how much more often the steered model would make the better-than-average choices.
Training reads the cached features of `steer score`; it never runs the model.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from steer.head import (
    CorrectionHead,
    HeadMismatchError,
    check_scale,
    embedding_fingerprint,
    fingerprints_match,
    output_embedding,
)
from steer.pool import Features, Key, Pool, load_features, load_rollouts, resolve_tau, select_pool
from steer.rollout import ROLLOUTS_FILE
from steer.scoring import INDEX_FILE, SCORES_DIR
from steer.store import atomic_write_json
from steer.version import __version__

TRAINING_FILE = "training.json"
OBJECTIVES = ("unlikelihood", "recipe")
MASKED = -1e9  # log-probability of an empty candidate slot: exp underflows to 0 without producing NaN


@dataclass(frozen=True)
class TrainSettings:
    """Head training settings. Pool and loss defaults follow the ReasonMaxxer recipe (50 problems, shortest 80%,
    advantages clipped at 2.5, KL weight 0.2, 8 rollouts per step, grad clip 1.0, warm-up then linear decay); the
    learning rate is the head's own (it is not a LoRA).

    Attributes:
        tau (`float`, *optional*, defaults to 1.4), tau_quantile (`float`, *optional*): the decision threshold in
            nats, or as the quantile of base entropy over the pool's positions (give one; a quantile wins).
        top_k (`int`, defaults to 5), rank (`int`, defaults to 16): the head's candidates and rank.
        pool_problems (`int`, defaults to 50), keep_shortest (`float`, defaults to 0.8), advantage_clip (`float`,
            defaults to 2.5): see [`select_pool`].
        kl_weight (`float`, defaults to 0.2): weight of the anchor.
        lr (`float`, defaults to 3e-3), steps (`int`, defaults to 150), warmup_steps (`int`, defaults to 50),
            rollouts_per_step (`int`, defaults to 8), grad_clip (`float`, defaults to 1.0): AdamW schedule.
        heldout_fraction (`float`, defaults to 0.2): share of pool problems held out to choose the checkpoint.
        scales (`tuple[float, ...]`, defaults to `(0.5, 1, 2, 4, 8)`): the correction strengths tried after training;
            the head keeps the one with the best held-out gain (training stops early, by held-out gain, before the
            correction grows large, so a trained head is often too timid). `(1.0,)` keeps the trained strength.
        eval_every (`int`, defaults to 10): steps between held-out evaluations.
        objective (`str`, defaults to `"unlikelihood"`): `"unlikelihood"` or the paper's `"recipe"` (module docstring).
        seed (`int`, defaults to 0).
    """

    tau: float | None = 1.4
    tau_quantile: float | None = None
    top_k: int = 5
    rank: int = 16
    pool_problems: int = 50
    keep_shortest: float = 0.8
    advantage_clip: float = 2.5
    kl_weight: float = 0.2
    lr: float = 3e-3
    steps: int = 150
    warmup_steps: int = 50
    rollouts_per_step: int = 8
    grad_clip: float = 1.0
    heldout_fraction: float = 0.2
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    eval_every: int = 10
    objective: str = "unlikelihood"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not self.scales:
            raise ValueError("scales must hold at least one correction strength")
        for scale in self.scales:
            check_scale(scale)


@dataclass
class DecisionBatch:
    """Decision points ready for the loss (M points, C = top_k + 1 candidate slots).

    Attributes:
        hidden (`torch.FloatTensor` of shape `(M, hidden_size)`).
        ids (`torch.LongTensor` of shape `(M, C)`): candidate ids; the last slot holds y_t when it is outside the
            top-k (else it is empty).
        base (`torch.FloatTensor` of shape `(M, C)`): base log-probabilities, [`MASKED`] in empty slots.
        steerable (`torch.BoolTensor` of shape `(M, C)`): the slots the head adjusts (the top-k).
        target (`torch.LongTensor` of shape `(M,)`): the slot of y_t.
        advantage (`torch.FloatTensor` of shape `(M,)`): the advantage of each point's rollout.
        rollout (`torch.LongTensor` of shape `(M,)`): index of each point's rollout in `Features.keys`.
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    base: torch.Tensor
    steerable: torch.Tensor
    target: torch.Tensor
    advantage: torch.Tensor
    rollout: torch.Tensor

    def select(self, mask: torch.Tensor) -> DecisionBatch:
        return DecisionBatch(**{name: value[mask] for name, value in vars(self).items()})

    def to(self, device: torch.device) -> DecisionBatch:
        return DecisionBatch(**{name: value.to(device) for name, value in vars(self).items()})

    def __len__(self) -> int:
        return self.target.shape[0]


def decision_batch(features: Features, advantages: dict[Key, float], tau: float, top_k: int) -> DecisionBatch:
    """The points of `features` whose entropy exceeds `tau` and whose rollout has an advantage (is in the pool),
    with their candidate sets and advantages."""
    if top_k > features.topk_ids.shape[1]:
        raise ValueError(f"top_k = {top_k} exceeds the {features.topk_ids.shape[1]} candidates stored by scoring")
    per_rollout = torch.tensor([advantages.get(key, math.nan) for key in features.keys], dtype=torch.float32)
    keep = (features.point_entropy > tau) & ~per_rollout[features.rollout].isnan()
    ids, logprobs, token = features.topk_ids[keep, :top_k], features.topk_logprobs[keep, :top_k], features.token[keep]
    match = ids == token.unsqueeze(-1)
    inside = match.any(dim=-1)
    extra_id = torch.where(inside, torch.zeros_like(token), token)
    masked = torch.full_like(token, MASKED, dtype=torch.float32)
    extra_logprob = torch.where(inside, masked, features.token_logprob[keep])
    rollout = features.rollout[keep]
    return DecisionBatch(
        hidden=features.hidden[keep].float(),
        ids=torch.cat([ids, extra_id.unsqueeze(-1)], dim=-1),
        base=torch.cat([logprobs, extra_logprob.unsqueeze(-1)], dim=-1).clamp(min=MASKED),
        steerable=torch.arange(top_k + 1).expand(len(token), -1) < top_k,
        target=torch.where(inside, match.float().argmax(dim=-1), torch.full_like(token, top_k)),
        advantage=per_rollout[rollout],
        rollout=rollout,
    )


def contrastive_loss(
    head: CorrectionHead, batch: DecisionBatch, embedding: torch.Tensor, kl_weight: float,
    objective: str = "unlikelihood",
) -> dict[str, torch.Tensor]:
    """The advantage-weighted contrastive loss (module docstring; `objective` is "unlikelihood" or "recipe") and its
    parts, plus the gain `mean A (q(y) / p(y) - 1)`, an offline estimate of the head's improvement (higher is
    better)."""
    delta = head(batch.hidden, embedding[batch.ids]) * batch.steerable
    log_q = torch.log_softmax(batch.base + delta, dim=-1)
    log_p = torch.log_softmax(batch.base, dim=-1)
    chosen_q = log_q.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1)
    chosen_p = log_p.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1)
    if objective == "recipe":
        policy = -(batch.advantage * chosen_q).mean()
    else:  # pushing a worse-than-average choice down stops at zero probability instead of at log 0 = -inf
        not_chosen = torch.log(-torch.expm1(chosen_q.clamp(max=-1e-6)))
        policy = torch.where(batch.advantage >= 0, -batch.advantage * chosen_q, batch.advantage * not_chosen).mean()
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return {
        "loss": policy + kl_weight * kl,
        "policy": policy,
        "kl": kl,
        "gain": (batch.advantage * torch.expm1(chosen_q - chosen_p)).mean(),
    }


@dataclass
class TrainResult:
    """A trained head (the held-out-best checkpoint) and the record of how it was made (`training.json`)."""

    head: CorrectionHead
    record: dict

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Save the head (safetensors and config) and `training.json` into `out_dir`."""
        self.head.save_pretrained(out_dir)
        atomic_write_json(Path(out_dir) / TRAINING_FILE, self.record)
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
    rollouts_dir = Path(rollouts_dir)
    pool = select_pool(load_rollouts(rollouts_dir), settings.pool_problems, settings.keep_shortest,
                       settings.advantage_clip)
    features = load_features(rollouts_dir, pool.keys)
    embedding = output_embedding(model).detach()
    if not fingerprints_match(features.embedding_fingerprint, embedding_fingerprint(embedding)):
        raise HeadMismatchError(f"{rollouts_dir} was scored with another model than {model.name_or_path}")
    tau = resolve_tau(features, None if settings.tau_quantile else settings.tau, settings.tau_quantile)
    points = decision_batch(features, pool.advantages, tau, settings.top_k).to(embedding.device)
    heldout_problems = _heldout_problems(pool, settings)
    in_heldout = torch.tensor([key[0] in heldout_problems for key in features.keys], device=embedding.device)
    train, heldout = points.select(~in_heldout[points.rollout]), points.select(in_heldout[points.rollout])
    if len(train) == 0:
        raise ValueError(f"no decision point above tau = {tau:.3f} nats in the training rollouts; lower tau")

    head = CorrectionHead.for_model(model, rank=settings.rank, top_k=settings.top_k, tau=tau, seed=settings.seed)
    head.config.tau_quantile = settings.tau_quantile
    fit = fit_head(head, train, heldout, embedding, settings, progress)
    scale_gains = choose_scale(head, heldout, embedding, settings)
    record = {
        "steer": __version__,
        "model": model.name_or_path,
        "data": _fingerprint_data(rollouts_dir),
        "settings": asdict(settings),
        "tau": tau,
        "pool": {
            "problems": len(pool.pass_rates),
            "rollouts": len(pool.advantages),
            "train_points": len(train),
            "heldout_points": len(heldout),
            "heldout_problems": sorted(heldout_problems),
            "pass_rates": pool.pass_rates,
            "decision_fraction": len(points) / max(1, sum(e.numel() for e in features.entropy)),
        },
        "curve": fit.curve,
        "heldout": fit.evaluations,
        "selected_step": fit.selected_step,
        "scale": head.scale,
        "scale_gains": scale_gains,
        "seconds": time.perf_counter() - start,
    }
    return TrainResult(head, record)


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
    train: DecisionBatch,
    heldout: DecisionBatch,
    embedding: torch.Tensor,
    settings: TrainSettings = TrainSettings(),
    progress: bool = False,
) -> Fit:
    """Optimise `head` on the `train` decision points with AdamW, evaluating on `heldout` every
    `settings.eval_every` steps, and leave it holding the weights with the best held-out gain (the last weights
    when `heldout` is empty).

    Args:
        head ([`CorrectionHead`]): the head to train (in place).
        train ([`DecisionBatch`]), heldout ([`DecisionBatch`]): see [`decision_batch`].
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
        parts = contrastive_loss(head, batch, embedding, settings.kl_weight, settings.objective)
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
    head: CorrectionHead, heldout: DecisionBatch, embedding: torch.Tensor, settings: TrainSettings
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
def _evaluate(head: CorrectionHead, heldout: DecisionBatch, embedding: torch.Tensor, settings: TrainSettings) -> dict:
    parts = contrastive_loss(head, heldout, embedding, settings.kl_weight, settings.objective)
    return {name: float(value) for name, value in parts.items()}


def _fingerprint_data(rollouts_dir: Path) -> dict:
    """Content hashes of the rollouts and the scores index, so a head names exactly the data it learned from."""
    return {
        "rollouts_dir": str(rollouts_dir),
        "rollouts_sha256": _sha256(rollouts_dir / ROLLOUTS_FILE),
        "scores_sha256": _sha256(rollouts_dir / SCORES_DIR / INDEX_FILE),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
