"""The head's objective: decision points turned into candidate sets, and the advantage-weighted contrastive loss.

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

`gain`, mean_t A (q(y_t) / p(y_t) - 1), is a bounded, importance-weighted estimate of how much more often the
steered model would make the better-than-average choices; training chooses its checkpoint and strength by the
held-out gain (see [`steer.pipeline.metrics.select_within_one_se`]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from steer.head import CorrectionHead
from steer.pipeline.folders.rollouts import RolloutKey
from steer.pipeline.folders.scores import Features
from steer.settings import ObjectiveName

MASKED = -1e9  # log-probability of an empty candidate slot: exp underflows to 0 without producing NaN


class Losses(NamedTuple):
    """The objective on a batch of M points, point by point.

    Attributes:
        point_policy (`torch.Tensor` of shape `(M,)`): each point's policy term.
        point_kl (`torch.Tensor` of shape `(M,)`): each point's anchor, `KL(p || q)` over its candidates.
        point_gain (`torch.Tensor` of shape `(M,)`): each point's gain (higher is better; 0 for a head that changes
            nothing).
        kl_weight (`float`): the anchor's weight in `loss`.

    `loss`, `policy`, `kl` and `gain` are the batch means (`loss = policy + kl_weight * kl`), what training
    minimises and reports.
    """

    point_policy: torch.Tensor
    point_kl: torch.Tensor
    point_gain: torch.Tensor
    kl_weight: float

    @property
    def policy(self) -> torch.Tensor:
        return self.point_policy.mean()

    @property
    def kl(self) -> torch.Tensor:
        return self.point_kl.mean()

    @property
    def loss(self) -> torch.Tensor:
        return self.policy + self.kl_weight * self.kl

    @property
    def gain(self) -> torch.Tensor:
        return self.point_gain.mean()


class Points:
    """Base of the batches of points the head learns from: tensors whose first dimension is the point, and
    `rollout`, each point's index in `Features.keys` (training samples rollouts and holds problems out by it).
    Fields that are not tensors (how the points are scored) carry over to selections unchanged."""

    rollout: torch.Tensor

    def select(self, mask: torch.Tensor) -> Points:
        return self._map(lambda value: value[mask])

    def to(self, device: torch.device) -> Points:
        return self._map(lambda value: value.to(device))

    def _map(self, apply) -> Points:
        return type(self)(**{name: apply(value) if isinstance(value, torch.Tensor) else value
                             for name, value in vars(self).items()})

    def __len__(self) -> int:
        return self.rollout.shape[0]

    def loss(self, head: CorrectionHead, embedding: torch.Tensor, kl_weight: float) -> Losses:
        """The [`Losses`] of `head` on these points: the loss to minimise and its parts, point by point."""
        raise NotImplementedError


@dataclass
class DecisionBatch(Points):
    """Decision points ready for the advantage-weighted loss (M points, C = top_k + 1 candidate slots).

    Attributes:
        hidden (`torch.FloatTensor` of shape `(M, hidden_size)`).
        ids (`torch.LongTensor` of shape `(M, C)`): candidate ids; the last slot holds y_t when it is outside the
            top-k (else it is empty).
        base (`torch.FloatTensor` of shape `(M, C)`): base log-probabilities, [`MASKED`] in empty slots.
        steerable (`torch.BoolTensor` of shape `(M, C)`): the slots the head adjusts (the top-k).
        target (`torch.LongTensor` of shape `(M,)`): the slot of y_t.
        advantage (`torch.FloatTensor` of shape `(M,)`): the advantage of each point's rollout.
        rollout (`torch.LongTensor` of shape `(M,)`): index of each point's rollout in `Features.keys`.
        objective (`str`, defaults to `"unlikelihood"`): how the points are scored (module docstring).
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    base: torch.Tensor
    steerable: torch.Tensor
    target: torch.Tensor
    advantage: torch.Tensor
    rollout: torch.Tensor
    objective: ObjectiveName = "unlikelihood"

    def loss(self, head: CorrectionHead, embedding: torch.Tensor, kl_weight: float) -> Losses:
        return contrastive_loss(head, self, embedding, kl_weight)


@dataclass
class BranchBatch(Points):
    """Decision points labelled by branch continuations (M points, k candidates): each candidate's own success.

    Attributes:
        hidden (`torch.FloatTensor` of shape `(M, hidden_size)`). ids (`torch.LongTensor` of shape `(M, k)`): the
            base top-k. base (`torch.FloatTensor` of shape `(M, k)`): their base log-probabilities.
        success (`torch.FloatTensor` of shape `(M, k)`): the share of each candidate's continuations graded right.
        rollout (`torch.LongTensor` of shape `(M,)`): index of each point's rollout in `Features.keys`.
    """

    hidden: torch.Tensor
    ids: torch.Tensor
    base: torch.Tensor
    success: torch.Tensor
    rollout: torch.Tensor

    def loss(self, head: CorrectionHead, embedding: torch.Tensor, kl_weight: float) -> Losses:
        return branch_loss(head, self, embedding, kl_weight)


def decision_batch(features: Features, advantages: dict[RolloutKey, float], tau: float, top_k: int,
                   objective: ObjectiveName = "unlikelihood") -> DecisionBatch:
    """The points of `features` whose entropy exceeds `tau` and whose rollout has an advantage (is in the pool),
    with their candidate sets and advantages, scored by `objective`."""
    if top_k > features.point_topk_ids.shape[1]:
        raise ValueError(
            f"top_k = {top_k} exceeds the {features.point_topk_ids.shape[1]} candidates stored by scoring")
    per_rollout = torch.tensor([advantages.get(key, math.nan) for key in features.keys], dtype=torch.float32)
    keep = (features.point_entropy > tau) & ~per_rollout[features.point_rollout].isnan()
    ids, logprobs = features.point_topk_ids[keep, :top_k], features.point_topk_logprobs[keep, :top_k]
    token = features.point_token[keep]
    match = ids == token.unsqueeze(-1)
    inside = match.any(dim=-1)
    extra_id = torch.where(inside, torch.zeros_like(token), token)
    masked = torch.full_like(token, MASKED, dtype=torch.float32)
    extra_logprob = torch.where(inside, masked, features.point_token_logprob[keep])
    rollout = features.point_rollout[keep]
    return DecisionBatch(
        hidden=features.point_hidden[keep].float(),
        ids=torch.cat([ids, extra_id.unsqueeze(-1)], dim=-1),
        base=torch.cat([logprobs, extra_logprob.unsqueeze(-1)], dim=-1).clamp(min=MASKED),
        steerable=torch.arange(top_k + 1).expand(len(token), -1) < top_k,
        target=torch.where(inside, match.float().argmax(dim=-1), torch.full_like(token, top_k)),
        advantage=per_rollout[rollout],
        rollout=rollout,
        objective=objective,
    )



def contrastive_loss(head: CorrectionHead, batch: DecisionBatch, embedding: torch.Tensor, kl_weight: float) -> Losses:
    """The advantage-weighted contrastive loss (module docstring; `batch.objective` is "unlikelihood" or "recipe")
    and its parts, with each point's gain `A (q(y) / p(y) - 1)`, an offline estimate of the head's improvement
    (higher is better)."""
    delta = head(batch.hidden, embedding[batch.ids], batch.steerable)
    log_q = torch.log_softmax(batch.base + delta, dim=-1)
    log_p = torch.log_softmax(batch.base, dim=-1)
    chosen_q = log_q.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1)
    chosen_p = log_p.gather(-1, batch.target.unsqueeze(-1)).squeeze(-1)
    if batch.objective == "recipe":
        policy = -batch.advantage * chosen_q
    else:  # pushing a worse-than-average choice down stops at zero probability instead of at log 0 = -inf
        not_chosen = torch.log(-torch.expm1(chosen_q.clamp(max=-1e-6)))
        policy = torch.where(batch.advantage >= 0, -batch.advantage * chosen_q, batch.advantage * not_chosen)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return Losses(policy, kl, batch.advantage * torch.expm1(chosen_q - chosen_p), kl_weight)


def branch_batch(features: Features, labels: dict[tuple[str, int, int], list[float]], tau: float,
                 top_k: int) -> BranchBatch:
    """The labelled points of `features` (entropy above `tau`, a success rate for each of the top-`top_k`
    candidates in `labels`, keyed by `(problem_id, sample, position)`)."""
    rows, success = [], []
    for row in (features.point_entropy > tau).nonzero().squeeze(-1).tolist():
        problem_id, sample = features.keys[int(features.point_rollout[row])]
        rates = labels.get((problem_id, sample, int(features.point_position[row])))
        if rates is not None and len(rates) >= top_k:
            rows.append(row)
            success.append(rates[:top_k])
    index = torch.tensor(rows, dtype=torch.long)
    return BranchBatch(
        hidden=features.point_hidden[index].float(),
        ids=features.point_topk_ids[index, :top_k],
        base=features.point_topk_logprobs[index, :top_k],
        success=torch.tensor(success, dtype=torch.float32).reshape(len(rows), top_k),
        rollout=features.point_rollout[index],
    )


def branch_loss(head: CorrectionHead, batch: BranchBatch, embedding: torch.Tensor, kl_weight: float) -> Losses:
    """The branch-labelled objective: raise the expected success of the steered choice among the top-k,

        mean_t [ -sum_j q_j (s_j - mean_j s_j) ] + kl_weight * mean_t KL(p || q),

    with q the steered and p the base distribution over the k candidates and s_j each candidate's success rate; a
    point's gain is the expected success gained there, sum_j (q_j - p_j) s_j."""
    delta = head(batch.hidden, embedding[batch.ids])
    log_q = torch.log_softmax(batch.base + delta, dim=-1)
    log_p = torch.log_softmax(batch.base, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    policy = -(q * (batch.success - batch.success.mean(dim=-1, keepdim=True))).sum(dim=-1)
    kl = (p * (log_p - log_q)).sum(dim=-1)
    return Losses(policy, kl, ((q - p) * batch.success).sum(dim=-1), kl_weight)
