"""Headroom against known answers.

- The planted model (`planted_choice` in conftest) has one decision point: greedy decoding answers 123456, and the
  rank-2 choice after "5" gives 123457. With 123457 as the gold answer one switch fixes every failure (go); with
  123458, which no choice of the model reaches, no switch can (no-go), though switches there change the answer.
- The built-in world's model, on which a trained head gains about 30 points (to about 0.9): go, with a ceiling that
  reaches the head's accuracy.
"""

from __future__ import annotations

import json
import math

import pytest

from steer import world
from steer.analysis.headroom import headroom
from steer.models import load_model
from steer.pipeline.metrics import McNemar
from steer.pipeline.problems import Problem
from steer.settings import TAU_FLOOR, HeadroomSettings

PLANTED = HeadroomSettings(max_new_tokens=12, tau=0.05, points=2, top_k=3, temperature=1.0, top_p=1.0, batch_size=16,
                           instruction="")


def planted_problems(gold: str, count: int = 8) -> list[Problem]:
    return [Problem(f"p{i}", f"Count {i}", gold, "planted") for i in range(count)]


def test_headroom_finds_the_planted_decision_point(planted_choice, tokenizer, tmp_path):
    problems = planted_problems("123457")
    report = headroom(planted_choice, tokenizer, problems, tmp_path, PLANTED, progress=False)
    assert report.base_accuracy == 0.0 and report.failures == report.branched == 8
    assert report.decision_points == report.points_tried == 1 and report.untried_failures == 0
    # one decision point, two alternatives (ranks 2 and 3), in each of two rounds: the random arm fixes nothing, so
    # the decision arm's failed rank-3 branch ("12345" then a stray token, and "12345" again) is branched again
    assert report.tries_per_failure == 4
    decision, random_arm, resample = (report.arms[arm] for arm in ("decision", "random", "resample"))
    assert decision.fixed_share == 1.0 and decision.try_success == 0.5  # rank 2 ("7") fixes, rank 3 does not
    assert random_arm.tries == decision.tries == resample.tries == 32
    assert random_arm.fixed == 0
    assert report.fixed_by_round == [8, 8]
    assert report.ceiling_accuracy == report.one_switch_accuracy == report.oracle_accuracy == 1.0
    assert report.rank_counts == {"2": 16}
    first_round = [step for step in report.critical if step.position == 5]
    assert len(first_round) == 8 and all(step.entropy > 0.05 for step in report.critical)
    assert report.median_entropy_percentile > 0.8
    p_seven = 1 / (1 + math.exp(2.0))
    assert resample.try_success <= 0.5 and abs(resample.try_success - p_seven) < 0.35
    assert report.decision_vs_random == McNemar(gained=8, lost=0, p_value=2 / 2**8)
    assert report.verdict == "go", report.reason
    assert json.loads((tmp_path / "headroom.json").read_text())["arms"]["decision"]["fixed"] == 8
    again = headroom(planted_choice, tokenizer, problems, tmp_path, PLANTED, progress=False)  # resumes: nothing to do
    assert again == report


def test_headroom_says_no_go_where_no_switch_fixes_a_failure(planted_choice, tokenizer, tmp_path):
    report = headroom(planted_choice, tokenizer, planted_problems("123458"), tmp_path, PLANTED, progress=False)
    assert report.failures == report.branched == 8
    branches = [json.loads(line) for line in (tmp_path / "branches.jsonl").read_text().splitlines()]
    decision = [b for b in branches if b["arm"] == "decision"]
    assert any("123457" in b["completion"] for b in decision), "the switches at the decision point changed nothing"
    assert {b["depth"] for b in decision} == {1, 2}, "failed branches were not branched again"
    assert report.arms["decision"].fixed == report.arms["random"].fixed == 0
    assert report.ceiling_accuracy == report.base_accuracy == 0.0
    assert report.verdict == "no-go" and "within" in report.reason


@pytest.mark.slow
def test_headroom_on_the_built_in_world_reaches_a_trained_head(tmp_path):
    """A head trained on the world reaches about 0.9 (README); its headroom must say go, with a ceiling as high."""
    model, tokenizer = load_model(world.model_path(), device="cpu")
    drawn = world.problems("test", 40, seed=11)
    problems = [Problem(p.id, p.question, str(p.answer), "world") for p in drawn]
    settings = HeadroomSettings(max_new_tokens=80, top_k=2, instruction=world.INSTRUCTION)
    report = headroom(model, tokenizer, problems, tmp_path, settings, progress=False)
    assert report.tau == TAU_FLOOR, "the world's entropy quantile lies below the floor"
    assert report.base_accuracy < 0.6
    assert report.ceiling_accuracy >= 0.9, report.reason
    assert report.arms["decision"].fixed > 3 * report.arms["random"].fixed
    assert report.verdict == "go", report.reason
