"""The settings of every stage, in one module that imports nothing heavy.

Each stage of the pipeline and each analysis takes one frozen dataclass saying how it runs (rollouts, scoring,
labels, head training, evaluation, headroom, footprint, the demo). They live here, apart from the stages, so that the
command line can build its options from them (`steer.cli.settings`) and answer `--help` without importing torch or
transformers. The stages import them from here; so can users.

Example:

```python
>>> from steer.settings import EvalSettings, DecodingSettings
>>> EvalSettings(samples=8, decoding=DecodingSettings(temperature=0.6, max_new_tokens=512)).samples
8
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
WORLD_INSTRUCTION = ""  # the built-in world's model was trained on bare questions
ObjectiveName = Literal["unlikelihood", "recipe"]
"""The loss of advantage-labelled points (see :mod:`steer.pipeline.objective`)."""
LabelSource = Literal["advantage", "branches"]
"""What a head learns from: the rollouts' advantages, or branch labels (`steer label`)."""
LabelPlacement = Literal["first", "random"]
"""Which of a rollout's decision points `steer label` branches: its first ones, or a seeded random draw."""
OBJECTIVES: tuple[ObjectiveName, ...] = get_args(ObjectiveName)
LABEL_SOURCES: tuple[LabelSource, ...] = get_args(LabelSource)
LABEL_PLACEMENTS: tuple[LabelPlacement, ...] = get_args(LabelPlacement)
PAPER_TAU = 1.4  # the paper's entropy gate (nats)
# The least entropy (nats) of a decision point when tau is a quantile: that of a 90/10 choice between two tokens. A
# model sure of itself almost everywhere (the built-in world's) has a 95% entropy quantile of a thousandth of a nat;
# without the floor its "decision points" would be steps with no real alternative.
TAU_FLOOR = 0.325
DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(1, 41))  # the footprint's gate thresholds (nats)


def check_scale(value: float) -> float:
    """`value` as a correction strength (a finite number >= 0), or a `ValueError` saying what it was."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a correction strength (scale) must be a finite number >= 0; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode. `temperature=0` means greedy search.

    Attributes:
        temperature (`float`, defaults to 0.6), top_p (`float`, defaults to 0.95): sampling parameters.
        max_new_tokens (`int`, defaults to 8192): the recipe's rollout budget.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "temperature": None, "top_p": None,
                    "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None,
                "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class SamplingSettings:
    """How a decoding job samples its problems; rollouts and evaluation derive their settings from it, each with its
    own defaults.

    Attributes:
        samples (`int`, defaults to 1): decodes per problem.
        decoding ([`DecodingSettings`]): temperature (0 is greedy), top-p and the length budget.
        batch_size (`int`, defaults to 64): sequences decoded together (on 2 CPU cores, 64 decoded SmolLM2-135M
            1.2x faster than 16; see `benches/rollout_speed.py`).
        seed (`int`, defaults to 0): base seed; each batch is seeded from it and the batch's contents.
        instruction (`str`): appended to each question (by default, asks for the answer in `\\boxed{}`).
    """

    samples: int = 1
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    batch_size: int = 64
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class RolloutSettings(SamplingSettings):
    """How rollouts are sampled (defaults: the ReasonMaxxer recipe, 20 samples at temperature 0.6, top-p 0.95, up to
    8192 new tokens). Fields as in [`SamplingSettings`]."""

    samples: int = 20


@dataclass(frozen=True)
class EvalSettings(SamplingSettings):
    """How benchmarks are decoded (defaults: the paper's evaluation, one sample at temperature 0.6 and top-p 0.95, up
    to 4096 new tokens). Fields as in [`SamplingSettings`]; `samples` above 1 gives avg@n and pass@k."""

    decoding: DecodingSettings = field(default_factory=lambda: DecodingSettings(max_new_tokens=4096))


@dataclass(frozen=True)
class ScoreSettings:
    """How rollouts are scored.

    Attributes:
        floor (`float`, defaults to 0.5): store features at positions with entropy above this (nats).
        top_k (`int`, defaults to 16): candidates stored per position (at least the head's `top_k`).
        max_batch_tokens (`int`, defaults to 4096): tokens (padding included) per forward pass.
        shard_rollouts (`int`, defaults to 256): rollouts per shard file.
        report_tau (`float`, defaults to 1.4): the threshold whose per-rollout share of positions is recorded.
    """

    floor: float = 0.5
    top_k: int = 16
    max_batch_tokens: int = 4096
    shard_rollouts: int = 256
    report_tau: float = 1.4


@dataclass(frozen=True)
class GateSettings:
    """The decision gate: which positions are decision points (base entropy above tau). Shared by training, branch
    labels and the headroom analysis, and resolved in one place ([`steer.pipeline.pool.resolve_tau`]).

    Attributes:
        tau (`float`, *optional*): the threshold in nats; given, it wins.
        tau_quantile (`float`, *optional*, defaults to 0.95): otherwise tau is this quantile of the base entropy over
            the generated positions (0.95 gates the top 5%), and at least [`TAU_FLOOR`]. A quantile adapts to the
            model's entropy scale: the paper's 1.4 nats suits its Qwen models, but gated 60% of the steps of
            SmolLM2-135M and made it worse.
    """

    tau: float | None = None
    tau_quantile: float | None = 0.95

    @property
    def quantile(self) -> float | None:
        """The quantile tau is resolved from, or `None` where tau is given."""
        return self.tau_quantile if self.tau is None else None


@dataclass(frozen=True)
class TrainSettings(GateSettings):
    """Head training settings. Pool and loss defaults follow the ReasonMaxxer recipe (50 problems, shortest 80%,
    advantages clipped at 2.5, KL weight 0.2, 8 rollouts per step, grad clip 1.0, warm-up then linear decay); the
    learning rate is the head's own (it is not a LoRA).

    Attributes:
        tau (`float`, *optional*), tau_quantile (`float`, *optional*, defaults to 0.95): the gate ([`GateSettings`]),
            resolved over the pool's generated positions.
        top_k (`int`, defaults to 5), rank (`int`, defaults to 16): the head's candidates and rank.
        pool_problems (`int`, defaults to 50), keep_shortest (`float`, defaults to 0.8), advantage_clip (`float`,
            defaults to 2.5): see [`select_pool`].
        kl_weight (`float`, defaults to 0.2): weight of the anchor.
        lr (`float`, defaults to 3e-3), steps (`int`, defaults to 150), warmup_steps (`int`, defaults to 50),
            rollouts_per_step (`int`, defaults to 8), grad_clip (`float`, defaults to 1.0): AdamW schedule.
        heldout_fraction (`float`, defaults to 0.2): share of pool problems held out to choose the checkpoint.
        null_margin (`float`, defaults to 2.0): the untrained head (which changes nothing) is kept unless the best
            checkpoint's held-out gain is this many standard errors above zero; among trained checkpoints the
            earliest within one standard error of the best is kept (see
            [`steer.pipeline.metrics.select_within_one_se`]).
        scales (`tuple[float, ...]`, defaults to `(0.5, 1, 2, 4, 8)`): the correction strengths tried after training;
            the head keeps the smallest whose held-out gain is within one standard error of the best (as it keeps
            the earliest such checkpoint; see [`steer.pipeline.metrics.select_within_one_se`]). `(1.0,)` keeps the
            trained strength.
        eval_every (`int`, defaults to 10): steps between held-out evaluations.
        objective (`str`, defaults to `"unlikelihood"`): `"unlikelihood"` or the paper's `"recipe"` (see
            :mod:`steer.pipeline.objective`); for advantage labels.
        labels (`str`, defaults to `"advantage"`): the targets: `"advantage"`, the paper's rollout advantages, or
            `"branches"`, each candidate's own success from branch continuations (run `steer label` first).
        seed (`int`, defaults to 0).
    """

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
    null_margin: float = 2.0
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    eval_every: int = 10
    objective: ObjectiveName = "unlikelihood"
    labels: LabelSource = "advantage"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_SOURCES)}; got {self.labels!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not self.scales:
            raise ValueError("scales must hold at least one correction strength")
        for scale in self.scales:
            check_scale(scale)
        if not (math.isfinite(self.null_margin) and self.null_margin >= 0):
            raise ValueError(f"null_margin must be finite and >= 0; got {self.null_margin!r}")


@dataclass(frozen=True)
class TuneSettings(EvalSettings):
    """How a head's strength is chosen by decoded accuracy (see :mod:`steer.pipeline.tuning`): held-out problems
    decoded by the base model and by the head at each strength (defaults: greedy, up to 512 new tokens). Fields as
    in [`EvalSettings`], and:

    Attributes:
        scales (`tuple[float, ...]`, defaults to `(0.5, 1, 2, 4, 8)`): the strengths (`head.scale`) tried; strength 0
            (the base model) is always a candidate.
    """

    decoding: DecodingSettings = field(default_factory=lambda: DecodingSettings(temperature=0.0, max_new_tokens=512))
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("scales must hold at least one correction strength")
        for scale in self.scales:
            check_scale(scale)


@dataclass(frozen=True)
class LabelSettings(GateSettings):
    """Which points are labelled, and how.

    Attributes:
        tau (`float`, *optional*), tau_quantile (`float`, *optional*, defaults to 0.95): the gate
            ([`GateSettings`]); use the same as `steer train`.
        points (`int`, defaults to 2): decision points labelled per rollout.
        placement (`str`, defaults to `"first"`): which of them: the rollout's first `points` decision points, or
            `"random"`: `points` drawn at random among all of them (seeded per rollout), a sample of the points a
            head acts at. A rollout's first decision points come early (on GSM8K with Qwen2.5-Coder-0.5B: median
            position 15 of a 276-token completion, the wording of the opening sentence, where its decision points
            as a whole have median position 70).
        top_k (`int`, defaults to 5): candidates continued per point (the head's top-k or more).
        continuations (`int`, defaults to 1): continuations per candidate: one greedy, or this many sampled at
            `temperature` and `top_p`, the candidate's label being the share graded right. One greedy continuation
            grades the candidate together with how the rest of the completion reacts to any change of its prefix;
            several estimate the candidate's own success rate (at that many times the tokens).
        temperature (`float`, defaults to 0.6), top_p (`float`, defaults to 0.95): the sampling of continuations
            when there are several (the rollouts' defaults; one continuation is greedy).
        pool_problems (`int`, defaults to 50): rollouts of this many problems with both outcomes, nearest a pass
            rate of 0.5 (the training pool's problems).
        max_new_tokens (`int`, defaults to 256): the completion's token budget, prefix included.
        batch_size (`int`, defaults to 64), seed (`int`, defaults to 0).
    """

    points: int = 2
    placement: LabelPlacement = "first"
    top_k: int = 5
    continuations: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    pool_problems: int = 50
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.placement not in LABEL_PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(LABEL_PLACEMENTS)}; got {self.placement!r}")
        if self.continuations < 1:
            raise ValueError(f"continuations must be at least 1; got {self.continuations!r}")
        if self.continuations > 1 and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"{self.continuations} sampled continuations need temperature > 0 and 0 < top_p <= 1; "
                             f"got temperature={self.temperature!r}, top_p={self.top_p!r}")


@dataclass(frozen=True)
class HeadroomSettings(GateSettings):
    """How the headroom is probed.

    Attributes:
        tau (`float`, *optional*), tau_quantile (`float`, *optional*, defaults to 0.95): the gate ([`GateSettings`],
            a trained head's tau with `steer analyze headroom --head`), resolved over all positions of the base
            completions.
        max_new_tokens (`int`, defaults to 256): the token budget of a completion, branches included.
        points (`int`, defaults to 3): decision points branched per completion, its highest-entropy ones.
        top_k (`int`, defaults to 5): candidates per point: the base choice and `top_k - 1` alternatives.
        rounds (`int`, defaults to 2): switches in a row: a branch that still fails is branched again at its own
            decision points after its last switch, as a head acts at every decision point it meets.
        beam (`int`, defaults to 2): failed branches of a failure carried into the next round (the likeliest
            switches first).
        temperature (`float`, defaults to 0.6), top_p (`float`, defaults to 0.95): sampling of the `resample` arm.
        batch_size (`int`, defaults to 64), seed (`int`, defaults to 0), instruction (`str`): as for rollouts.
        min_gain (`float`, defaults to 0.05): the least accuracy gain of the ceiling over base for a "go".
    """

    max_new_tokens: int = 256
    points: int = 3
    top_k: int = 5
    rounds: int = 2
    beam: int = 2
    temperature: float = 0.6
    top_p: float = 0.95
    batch_size: int = 64
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION
    min_gain: float = 0.05

    def __post_init__(self) -> None:
        if self.top_k < 2 or min(self.points, self.rounds, self.beam) < 1:
            raise ValueError(f"headroom needs top_k >= 2 and points, rounds and beam >= 1; got top_k={self.top_k}, "
                             f"points={self.points}, rounds={self.rounds}, beam={self.beam}")


@dataclass(frozen=True)
class FootprintSettings:
    """How the comparison is made.

    Attributes:
        rollouts ([`RolloutSettings`]): how the RL model's completions are sampled (defaults: 4 per problem at
            temperature 0.6, top-p 0.95, 1024 new tokens).
        max_batch_tokens (`int`, defaults to 4096): tokens (padding included) per teacher-forced pass.
        taus (`tuple[float, ...]`): thresholds at which the entropy gate's precision and recall are reported.
    """

    rollouts: RolloutSettings = field(
        default_factory=lambda: RolloutSettings(samples=4, decoding=DecodingSettings(max_new_tokens=1024))
    )
    max_batch_tokens: int = 4096
    taus: tuple[float, ...] = DEFAULT_TAUS


@dataclass
class DemoSettings:
    """How much work the demo does. The defaults suit the built-in world; [`DemoSettings.for_model`] gives the
    defaults for another model (a quantile tau, the usual instruction, longer completions).

    Args:
        train_problems (`int`, defaults to 200), test_problems (`int`, defaults to 200): problem counts.
        samples (`int`, defaults to 16): rollouts per training problem.
        max_new_tokens (`int`, defaults to 80): per completion, rollouts and evaluation alike.
        batch_size (`int`, defaults to 64).
        instruction (`str`): appended to each question (the world's model was trained on bare questions).
        floor (`float`, defaults to 0.2): entropy above which scoring stores features; below any tau tried.
        train ([`TrainSettings`]): head training; on the world tau = 0.4 nats gates a few percent of positions.
        seed (`int`, defaults to 0): seeds the problems drawn, the sampling and the head's initialisation.
    """

    train_problems: int = 200
    test_problems: int = 200
    samples: int = 16
    max_new_tokens: int = 80
    batch_size: int = 64
    instruction: str = WORLD_INSTRUCTION
    floor: float = 0.2
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        tau=0.4, pool_problems=200, rank=16, top_k=2, kl_weight=0.05, steps=150, warmup_steps=20, rollouts_per_step=32,
        lr=1e-2,
    ))
    seed: int = 0

    @classmethod
    def for_model(cls, **overrides) -> DemoSettings:
        """Defaults for a model other than the world's: 8 rollouts per problem of up to 512 tokens, tau as the
        95% quantile of the base entropy, top-5 candidates."""
        train = TrainSettings(tau=None, tau_quantile=0.95, pool_problems=50, top_k=5, steps=150, warmup_steps=20,
                              rollouts_per_step=16)
        settings = cls(samples=8, max_new_tokens=512, batch_size=64, instruction=DEFAULT_INSTRUCTION, floor=0.5,
                       train=train)
        for name, value in overrides.items():
            setattr(settings, name, value)
        return settings

