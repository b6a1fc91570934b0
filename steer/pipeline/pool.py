"""Step 3 of the method: what the head learns from — the pool of rollouts, their advantages, and the decision points.

Following the ReasonMaxxer recipe: keep the problems whose pass rate is nearest 0.5 among those with both correct
and incorrect rollouts; keep the shortest 80% of their rollouts; give each rollout the advantage
`A = (r - mean) / std` over its problem's rollouts, clipped to [-2.5, 2.5]; and learn only at generated positions
whose base entropy exceeds tau.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from steer.errors import SteerError
from steer.pipeline.folders.rollouts import RolloutKey
from steer.settings import TAU_FLOOR, GateSettings


class NoContrastError(SteerError, ValueError):
    """No problem has both a correct and an incorrect rollout: there is nothing to contrast."""


@dataclass(frozen=True)
class Pool:
    """The rollouts the head learns from.

    Attributes:
        pass_rates (`dict[str, float]`): mean reward of each pool problem over all its rollouts.
        advantages (`dict[RolloutKey, float]`): the clipped, normalised advantage of each kept rollout.
    """

    pass_rates: dict[str, float]
    advantages: dict[RolloutKey, float]

    @property
    def keys(self) -> list[RolloutKey]:
        return list(self.advantages)


class GradedRollout(Protocol):
    """What the pool reads of a rollout: a [`RolloutRecord`] has it."""

    @property
    def problem_id(self) -> str: ...

    @property
    def sample(self) -> int: ...

    @property
    def reward(self) -> float: ...

    @property
    def num_tokens(self) -> int: ...


def select_pool(
    rollouts: Sequence[GradedRollout], problems: int = 50, keep_shortest: float = 0.8, clip: float = 2.5
) -> Pool:
    """Choose the pool: the `problems` problems with both outcomes whose pass rate is nearest 0.5, the shortest
    `keep_shortest` fraction of their rollouts, and each rollout's advantage over its problem's rollouts
    (population std, eps 1e-8), clipped to `[-clip, clip]`.

    Raises:
        [`NoContrastError`]: when every problem's rollouts are all right or all wrong.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> rollouts = [SimpleNamespace(problem_id="a", sample=s, reward=float(s % 2), num_tokens=10) for s in range(4)]
    >>> round(select_pool(rollouts, keep_shortest=1.0).advantages[("a", 1)], 6)  # (1 - 0.5) / (0.5 + 1e-8)
    1.0
    ```
    """
    rewards: dict[str, list[float]] = defaultdict(list)
    for rollout in rollouts:
        rewards[rollout.problem_id].append(float(rollout.reward))
    contrasted = {pid: r for pid, r in rewards.items() if max(r) > min(r)}
    if not contrasted:
        outcome = "all right" if all(min(r) > 0 for r in rewards.values()) else "all wrong" if all(
            max(r) == 0 for r in rewards.values()) else "all right or all wrong"
        raise NoContrastError(
            f"no contrast to learn from: each of the {len(rewards)} problems has its rollouts {outcome} "
            "(the head learns from problems with both correct and incorrect rollouts; use harder or easier "
            "problems, or more samples per problem)"
        )
    nearest = sorted(contrasted, key=lambda pid: (abs(np.mean(contrasted[pid]) - 0.5), pid))[:problems]
    stats = {pid: (float(np.mean(contrasted[pid])), float(np.std(contrasted[pid]))) for pid in nearest}
    candidates = sorted(
        (r for r in rollouts if r.problem_id in stats), key=lambda r: (r.num_tokens, r.problem_id, r.sample)
    )
    kept = candidates[: max(1, math.floor(keep_shortest * len(candidates) + 1e-9))]
    advantages = {}
    for rollout in kept:
        mean, std = stats[rollout.problem_id]
        value = (float(rollout.reward) - mean) / (std + 1e-8)
        advantages[(rollout.problem_id, rollout.sample)] = float(np.clip(value, -clip, clip))
    return Pool(pass_rates={pid: stats[pid][0] for pid in nearest}, advantages=advantages)


def quantile_tau(entropy: np.ndarray, quantile: float) -> float:
    """The entropy threshold at the `quantile` of the base entropy `entropy` (nats, one per generated position; 0.95
    gates the top 5% of positions), and at least [`TAU_FLOOR`], so that a model sure of itself almost everywhere
    gets no decision points where it has no real alternative."""
    if not 0 < quantile < 1:
        raise ValueError(f"tau_quantile must lie strictly between 0 and 1; got {quantile}")
    return max(float(np.quantile(entropy, quantile)), TAU_FLOOR)


def resolve_tau(gate: GateSettings, entropy: torch.Tensor, floor: float = 0.0) -> float:
    """The gate's threshold in nats: its `tau` as given, or [`quantile_tau`] of `entropy` (the base entropy of the
    generated positions it will gate). It must lie above `floor`, the entropy below which scoring stored no
    features.

    Example:

    ```python
    >>> resolve_tau(GateSettings(tau_quantile=0.5), torch.tensor([0.1, 0.6, 0.9, 2.0]))
    0.75
    ```
    """
    if gate.quantile is None and gate.tau is None:
        raise ValueError("give tau (nats) or tau_quantile (a fraction of positions)")
    tau = gate.tau if gate.tau is not None else quantile_tau(entropy.numpy(), gate.quantile)
    if tau < floor:
        raise ValueError(
            f"tau = {tau:.3f} nats lies below the storage floor {floor} of the scores: positions between "
            "them were not stored; score again with a lower --floor"
        )
    return tau
