"""The RL footprint: where, and how far, an RL-trained model's choices differ from its base model's.

On completions sampled from the RL model, both models are teacher-forced and compared at every generated position:
does the top-1 token differ; what rank does the RL model's top-1 have in the base distribution; how high is the
base entropy there; and how well "base entropy > tau" predicts the positions that differ. The paper's finding is
that RL changes the top-1 at a few percent of positions, nearly always to a token in the base top-5, and at
high-entropy positions.

Outputs, under the run's folder: `rollouts/` (the RL model's completions, a rollout store), `positions.safetensors`
(per position: base entropy, whether the top-1 differs, the RL choice's base rank; per completion: its length),
`footprint.json` (the report) and, with matplotlib installed, `entropy.png` and `rank.png`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_json
from steer.functional import entropy_topk
from steer.pipeline.decoding import Decoder
from steer.pipeline.folders.rollouts import RolloutFolder, TokenSequence, sequence_length
from steer.pipeline.problems import Problem
from steer.pipeline.progress import ThroughputBar
from steer.pipeline.rollout import run_rollouts
from steer.pipeline.scoring import teacher_force, token_batches
from steer.settings import DEFAULT_TAUS, FootprintSettings

POSITIONS_FILE = "positions.safetensors"
REPORT_FILE = "footprint.json"
RANKS = (1, 5, 10)
# The paper's footprint: RL's top-1 differs at 1-3% of positions, and is in the base top-5 wherever it differs. A
# change within these limits is sparse policy selection, the kind a head at decision points can reproduce.
SPARSE_FRACTION = 0.05
SPARSE_TOP5_SHARE = 0.9
ENTROPY_BINS = 40


@dataclass(frozen=True)
class Positions:
    """Per generated position, rollouts concatenated, and where each rollout's positions lie.

    Attributes:
        entropy (`torch.FloatTensor` of shape `(positions,)`): the base model's entropy (nats).
        differ (`torch.BoolTensor` of shape `(positions,)`): the RL model's top-1 token is not a top-1 token of the
            base model (`rank > 1`; a token tied for the base model's first place counts as the same choice).
        rank (`torch.LongTensor` of shape `(positions,)`): 1 + the number of tokens the base model scores strictly
            above the RL model's top-1 (1: the RL choice is the base choice, or tied with it).
        lengths (`torch.LongTensor` of shape `(rollouts,)`): each rollout's number of positions, in order; they sum
            to `positions`.
    """

    entropy: torch.Tensor
    differ: torch.Tensor
    rank: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name).numel() for name in ("entropy", "differ", "rank")}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"positions disagree in size: {sizes}")
        if self.lengths.dim() != 1 or self.lengths.is_floating_point() or bool((self.lengths < 0).any()):
            raise ValueError(f"lengths must be a 1-D tensor of non-negative integers, got {self.lengths}")
        if (total := int(self.lengths.sum())) != sizes["entropy"]:
            raise ValueError(f"the rollouts' lengths sum to {total}, but there are {sizes['entropy']} positions")

    def differ_by_rollout(self) -> tuple[torch.Tensor, ...]:
        """`differ` cut into one `torch.BoolTensor` of shape `(length,)` per rollout, in order."""
        return self.differ.split(self.lengths.tolist())

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({name: getattr(self, name) for name in ("entropy", "differ", "rank", "lengths")}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Positions:
        tensors = load_file(path)
        if "lengths" not in tensors:
            raise ValueError(f"{path} has no rollout lengths (written by an earlier steer): run the footprint again")
        return cls(**tensors)


def compare_positions(
    base: PreTrainedModel, rl: PreTrainedModel, rollouts: Sequence[TokenSequence], max_batch_tokens: int = 4096,
    progress: bool = True,
) -> Positions:
    """Teacher-force both models over `rollouts` (rollout records, or anything with `prompt_ids` and
    `completion_ids`) and compare them at every completion position, in the order of `rollouts`.

    Example:

    ```python
    >>> positions = compare_positions(base, rl, RolloutFolder("runs/rl").read_records())  # doctest: +SKIP
    >>> positions.differ.float().mean()  # doctest: +SKIP
    ```
    """
    order = sorted(range(len(rollouts)), key=lambda i: sequence_length(rollouts[i]))
    ordered = [rollouts[i] for i in order]
    parts: list[dict[str, torch.Tensor] | None] = [None] * len(rollouts)
    bar = ThroughputBar(len(rollouts), "comparing", "rollout", progress)
    for batch in token_batches(ordered, max_batch_tokens):
        group = [ordered[i] for i in batch]
        for index, (b, r) in zip(batch, zip(teacher_force(base, group), teacher_force(rl, group))):
            parts[order[index]] = _compare(b[0], r[0])
        bar.advance(len(batch), sum(len(rollout.completion_ids) for rollout in group))
    bar.close()
    return Positions(*(torch.cat([p[name] for p in parts]) for name in ("entropy", "differ", "rank")),
                     lengths=torch.tensor([len(rollout.completion_ids) for rollout in rollouts], dtype=torch.long))


def _compare(base_logits: torch.Tensor, rl_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    width = min(base_logits.shape[-1], rl_logits.shape[-1])  # vocabularies padded to different sizes
    base_logits, rl_logits = base_logits[:, :width], rl_logits[:, :width]
    entropy = entropy_topk(base_logits, 1).entropy
    rl_choice = entropy_topk(rl_logits, 1).indices[:, 0]
    base_float = base_logits.float()
    chosen = base_float.gather(-1, rl_choice.unsqueeze(-1))
    rank = 1 + (base_float > chosen).sum(-1)
    return {"entropy": entropy.cpu(), "differ": (rank > 1).cpu(), "rank": rank.cpu()}


@dataclass(frozen=True)
class GateQuality:
    """How well "base entropy > `tau`" predicts the positions where the top-1 differs: the share of positions it
    gates, its `precision` and `recall` (`None` where nothing is gated, or nothing differs)."""

    tau: float
    gated_fraction: float
    precision: float | None
    recall: float | None


@dataclass(frozen=True)
class EntropyContrast:
    """Mean base entropy over all positions and over the differing ones (`None` if none differ), and their ratio."""

    mean_all: float
    mean_differing: float | None
    ratio: float | None


@dataclass(frozen=True)
class Quartiles:
    """The mean and quartiles of some values (quartiles interpolated linearly, as `torch.quantile` does, so counts
    may have fractional quartiles).

    Example:

    ```python
    >>> Quartiles.of(torch.tensor([0, 1, 2]))
    Quartiles(mean=1.0, q1=0.5, median=1.0, q3=1.5)
    ```
    """

    mean: float
    q1: float
    median: float
    q3: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Quartiles | None:
        """The figures of `values` (a tensor of any shape and dtype), `None` where there are none."""
        if values.numel() == 0:
            return None
        values = values.double().flatten()
        q1, median, q3 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        return cls(mean=float(values.mean()), q1=q1, median=median, q3=q3)


@dataclass(frozen=True)
class RolloutSpread:
    """How the differing positions fall over the rollouts compared.

    Attributes:
        rollouts (`int`): rollouts compared. with_any (`float`): the share with at least one differing position.
        per_rollout ([`Quartiles`], *optional*): differing positions per rollout (`None` without rollouts).
        first ([`Quartiles`], *optional*): the index (from 0) of each rollout's first differing position, over the
            rollouts with one.
        place ([`Quartiles`], *optional*): where in its rollout each differing position lies, as index / length
            (0: the first token; the last token of a rollout of n tokens is at (n - 1) / n).
        differ_fraction_right (`float`, *optional*), differ_fraction_wrong (`float`, *optional*): the share of
            positions that differ in right rollouts (reward above 0: with a shaped reward, any rewarded rollout) and
            in the others, where rewards were given and such rollouts have positions.
    """

    rollouts: int
    with_any: float
    per_rollout: Quartiles | None
    first: Quartiles | None
    place: Quartiles | None
    differ_fraction_right: float | None = None
    differ_fraction_wrong: float | None = None


def rollout_spread(positions: Positions, rewards: Sequence[float] | None = None) -> RolloutSpread:
    """How the differing positions fall over the rollouts, and, with the rollouts' `rewards` (one per rollout, in
    the order of `positions`), how often positions differ in right rollouts (reward above 0) and in wrong ones.

    Example:

    ```python
    >>> p = Positions(torch.rand(5), torch.tensor([False, True, False, False, False]), torch.tensor([1, 2, 1, 1, 1]),
    ...               lengths=torch.tensor([2, 3]))
    >>> spread = rollout_spread(p, rewards=[1.0, 0.0])
    >>> spread.with_any, spread.first.median, spread.differ_fraction_right, spread.differ_fraction_wrong
    (0.5, 1.0, 0.5, 0.0)
    ```
    """
    parts = positions.differ_by_rollout()
    if rewards is not None and len(rewards) != len(parts):
        raise ValueError(f"{len(rewards)} rewards for {len(parts)} rollouts")
    counts = torch.tensor([int(part.sum()) for part in parts], dtype=torch.float64)
    hits = [(part.nonzero()[:, 0], len(part)) for part in parts if part.any()]
    fractions: dict[str, float | None] = {"right": None, "wrong": None}
    if rewards is not None:
        right = torch.tensor([reward > 0 for reward in rewards], dtype=torch.bool)
        for name, rows in (("right", right), ("wrong", ~right)):
            tokens = int(positions.lengths[rows].sum())
            fractions[name] = float(counts[rows].sum()) / tokens if tokens else None
    return RolloutSpread(
        rollouts=len(parts),
        with_any=len(hits) / len(parts) if parts else 0.0,
        per_rollout=Quartiles.of(counts),
        first=Quartiles.of(torch.tensor([float(index[0]) for index, _ in hits])),
        place=Quartiles.of(torch.cat([index.double() / length for index, length in hits])) if hits else None,
        differ_fraction_right=fractions["right"],
        differ_fraction_wrong=fractions["wrong"],
    )


@dataclass(frozen=True)
class FootprintReport:
    """The footprint's figures (see the module docstring).

    Attributes:
        positions (`int`), differing (`int`), differ_fraction (`float`): positions compared, and where the top-1
            differs.
        rank_share (`dict[str, float]`): share of RL choices inside the base top-1, top-5, top-10 (keys "1", "5",
            "10"), over all positions; rank_share_differing: the same over the differing positions (top-5, top-10).
        entropy ([`EntropyContrast`]). gate (`list[GateQuality]`): one per tau of the grid.
        spread ([`RolloutSpread`]): how the differing positions fall over the rollouts.
        histograms (`dict`): the counts behind the plots.
        verdict (`str`), reason (`str`): "sparse" (RL's change is the paper's kind: at most [`SPARSE_FRACTION`] of
            positions, at least [`SPARSE_TOP5_SHARE`] of them to a base top-5 token), "dense" (it is not: a head
            acting at a few decision points cannot reproduce it) or "none" (nothing differs), and why, in one line.
    """

    positions: int
    differing: int
    differ_fraction: float
    rank_share: dict[str, float]
    rank_share_differing: dict[str, float] | None
    entropy: EntropyContrast
    gate: list[GateQuality]
    spread: RolloutSpread
    histograms: dict
    verdict: str
    reason: str


def sparsity_verdict(differ_fraction: float, top5_share_differing: float | None) -> tuple[str, str]:
    """Whether RL's change is sparse policy selection, as in the paper, from the share of positions whose top-1
    differs and the share of those where RL's choice is in the base top-5: the verdict and its reason."""
    if top5_share_differing is None:
        return "none", "the RL model's top-1 never differs from the base model's: there is no change to reproduce"
    figures = (f"RL's top-1 differs at {differ_fraction:.1%} of positions (the paper: 1-3%), and is in the base "
               f"top-5 at {top5_share_differing:.1%} of them (the paper: all)")
    if differ_fraction <= SPARSE_FRACTION and top5_share_differing >= SPARSE_TOP5_SHARE:
        return "sparse", f"{figures}: sparse policy selection, which a head at decision points can reproduce"
    return "dense", (f"{figures}: not sparse policy selection; a head that re-ranks the base top-k at a few "
                     "decision points cannot reproduce this change")


def footprint_report(positions: Positions, taus: Sequence[float] = DEFAULT_TAUS,
                     rewards: Sequence[float] | None = None) -> FootprintReport:
    """The footprint's figures from per-position comparisons, and the rollouts' `rewards` where given (see
    [`rollout_spread`]).

    Example:

    ```python
    >>> p = Positions(torch.tensor([0.1, 2.0, 0.2, 1.8]), torch.tensor([False, True, False, False]),
    ...               torch.tensor([1, 2, 1, 1]), lengths=torch.tensor([4]))
    >>> footprint_report(p, taus=[1.0]).gate[0]
    GateQuality(tau=1.0, gated_fraction=0.5, precision=0.5, recall=1.0)
    ```
    """
    entropy, differ, rank = positions.entropy.double(), positions.differ, positions.rank
    total, differing = entropy.numel(), int(differ.sum())
    if total == 0:
        raise ValueError("no positions to compare: every completion is empty")
    mean_all = float(entropy.mean())
    mean_differing = float(entropy[differ].mean()) if differing else None
    rank_share_differing = None
    if differing:
        rank_share_differing = {str(k): float((rank[differ] <= k).double().mean()) for k in RANKS[1:]}
    verdict, reason = sparsity_verdict(differing / total, rank_share_differing["5"] if differing else None)
    return FootprintReport(
        positions=total,
        differing=differing,
        differ_fraction=differing / total,
        rank_share={str(k): float((rank <= k).double().mean()) for k in RANKS},
        rank_share_differing=rank_share_differing,
        entropy=EntropyContrast(
            mean_all=mean_all,
            mean_differing=mean_differing,
            ratio=mean_differing / mean_all if mean_differing is not None and mean_all > 0 else None,
        ),
        gate=[_gate(entropy, differ, tau) for tau in taus],
        spread=rollout_spread(positions, rewards),
        histograms=_histograms(entropy, differ, rank),
        verdict=verdict,
        reason=reason,
    )


def _gate(entropy: torch.Tensor, differ: torch.Tensor, tau: float) -> GateQuality:
    gated = entropy > tau
    hits = int((gated & differ).sum())
    return GateQuality(
        tau=float(tau),
        gated_fraction=float(gated.double().mean()),
        precision=hits / int(gated.sum()) if gated.any() else None,
        recall=hits / int(differ.sum()) if differ.any() else None,
    )


def _histograms(entropy: torch.Tensor, differ: torch.Tensor, rank: torch.Tensor) -> dict:
    top = max(float(entropy.max()), 1e-6)
    edges = torch.linspace(0.0, top, ENTROPY_BINS + 1, dtype=torch.float64)
    counts = [torch.histogram(values, bins=edges).hist.long().tolist() for values in (entropy, entropy[differ])]
    ranks = rank[differ]
    return {
        "entropy_edges": edges.tolist(),
        "entropy_all": counts[0],
        "entropy_differing": counts[1],
        "rank_differing": {**{str(k): int((ranks == k).sum()) for k in range(2, 11)}, ">10": int((ranks > 10).sum())},
    }


def plot_footprint(report: FootprintReport, out_dir: Path) -> list[Path]:
    """Draw `entropy.png` (base entropy of differing against all positions) and `rank.png` (the RL choice's rank
    in the base distribution at differing positions) into `out_dir`; needs matplotlib (`pip install steer[analysis]`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report.histograms
    edges = hist["entropy_edges"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (("entropy_all", "all positions"), ("entropy_differing", "top-1 differs")):
        counts = hist[name]
        share = [c / max(sum(counts), 1) for c in counts]
        ax.bar(edges[:-1], share, width=widths, align="edge", alpha=0.5, label=label)
    ax.set(xlabel="base entropy (nats)", ylabel="share of positions", title="Where RL changes the top-1")
    ax.legend()
    paths = [out_dir / "entropy.png", out_dir / "rank.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ranks = hist["rank_differing"]
    ax.bar(list(ranks), list(ranks.values()))
    ax.set(xlabel="rank of the RL choice in the base distribution", ylabel="positions",
           title="RL choices at positions that differ")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


@dataclass(frozen=True)
class FootprintResult:
    """A footprint run: the two models, the RL completions compared and their accuracy (mean reward), the
    [`FootprintReport`], and the plots written (none without matplotlib)."""

    base: str
    rl: str
    rollouts: int
    rl_accuracy: float
    report: FootprintReport
    plots: list[str]


def footprint(
    base: PreTrainedModel,
    rl: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    out_dir: str | os.PathLike,
    settings: FootprintSettings = FootprintSettings(),
    *,
    sampler: PreTrainedModel | Decoder | None = None,
    progress: bool = True,
) -> FootprintResult:
    """Sample the RL model's completions on `problems`, compare the two models on them, and write the report.

    Args:
        base (`PreTrainedModel`), rl (`PreTrainedModel`): the two models; `tokenizer` is shared.
        problems (`Sequence[Problem]`): the problems whose completions are compared.
        out_dir (`str` or `os.PathLike`): the run's folder (see the module docstring); sampling resumes there.
        settings ([`FootprintSettings`]): sampling, batch size and the tau grid.
        sampler (`PreTrainedModel` or [`Decoder`], *optional*): what samples the completions: `rl` by default, or
            an engine that decodes with the RL model's weights, which is not checked (a vLLM decoder samples far
            faster than `generate`).
        progress (`bool`, defaults to `True`): show progress bars.

    Returns:
        [`FootprintResult`], also written to `out_dir/footprint.json`.
    """
    out = Path(out_dir)
    run_rollouts(rl if sampler is None else sampler, tokenizer, problems, out / "rollouts", settings.rollouts,
                 progress=progress)
    wanted = {problem.id for problem in problems}  # the store may hold other problems from an earlier run
    rollouts = [r for r in RolloutFolder(out / "rollouts").read_records() if r.problem_id in wanted]
    positions = compare_positions(base, rl, rollouts, settings.max_batch_tokens, progress)
    positions.save(out / POSITIONS_FILE)
    report = footprint_report(positions, settings.taus, [r.reward for r in rollouts])
    try:
        plots = [str(path) for path in plot_footprint(report, out)]
    except ImportError:
        plots = []
    result = FootprintResult(base=base.name_or_path, rl=rl.name_or_path, rollouts=len(rollouts),
                             rl_accuracy=sum(r.reward for r in rollouts) / len(rollouts), report=report, plots=plots)
    atomic_write_json(out / REPORT_FILE, asdict(result))
    return result
