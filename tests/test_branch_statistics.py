"""The statistics `benches/head_generalisation.py` reports on branch labels, on simulated labels whose truth is known:
the candidate effect (the variance of the candidates' own success rates at a point, beyond the sampling noise of a
few graded continuations) and the agreement of two labellings of the same points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from head_generalisation import candidate_effect, label_agreement  # noqa: E402


def simulated_shares(rates: torch.Tensor, continuations: int, generator: torch.Generator) -> torch.Tensor:
    """Each candidate's share of `continuations` Bernoulli draws at its true rate `rates` `(points, k)`."""
    draws = torch.rand(*rates.shape, continuations, generator=generator) < rates.unsqueeze(-1)
    return draws.float().mean(-1)


@pytest.mark.parametrize("continuations", [2, 4])
def test_candidate_effect_is_zero_when_candidates_share_one_rate(continuations):
    """Candidates at a point with the same true rate (the rate differing between points): the raw variance of
    their shares is all sampling noise, and the estimate is within three standard errors of zero."""
    generator = torch.Generator().manual_seed(1)
    points = 3000
    rates = torch.rand(points, 1, generator=generator).expand(points, 5)
    shares = simulated_shares(rates, continuations, generator)
    groups = torch.arange(points) // 10
    effect, se = candidate_effect(shares, continuations, groups)
    assert shares.var(-1).mean() > 0.03  # the noise the estimate must remove (E p(1 - p) / n: 0.04 to 0.08)
    assert abs(effect) < 3 * se


def test_candidate_effect_recovers_the_variance_of_the_true_rates():
    """Candidates whose true rates at a point are 0.5 +- 0.3 (variance 0.1125 with divisor k - 1 for k = 4:
    two at 0.8, two at 0.2): the estimate from four continuations each finds it."""
    generator = torch.Generator().manual_seed(2)
    points = 3000
    rates = torch.tensor([0.8, 0.2, 0.8, 0.2]).repeat(points, 1)
    shares = simulated_shares(rates, 4, generator)
    effect, se = candidate_effect(shares, 4, torch.arange(points) // 10)
    truth = rates[0].var().item()
    assert abs(effect - truth) < 3 * se and se < 0.01


def test_label_agreement_compares_candidates_within_points():
    """A point's own level is taken out (a labelling that is higher everywhere at a point agrees fully); reversed
    preferences disagree fully; points one labelling lacks, or holds with other candidates, are left out."""
    labels = {("a", 0, 1): [1.0, 0.0, 0.5], ("b", 0, 2): [0.0, 1.0, 0.0], ("c", 0, 3): [0.0, 0.0, 1.0]}
    shifted = {key: [v + 0.25 * i for v in values] for i, (key, values) in enumerate(labels.items())}
    reversed_ = {key: [-v for v in values] for key, values in labels.items()}
    assert label_agreement(labels, shifted) == pytest.approx({"points": 3, "within_point_correlation": 1.0})
    assert label_agreement(labels, reversed_)["within_point_correlation"] == pytest.approx(-1.0)
    partial = {("a", 0, 1): [1.0, 0.0, 0.5], ("b", 0, 2): [0.0, 1.0], ("z", 0, 9): [1.0, 0.0, 0.0]}
    assert label_agreement(labels, partial) == {"points": 1, "within_point_correlation": None}
