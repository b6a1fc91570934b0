"""Headroom on a planted model (`planted_choice` in conftest) whose failures exactly one switch at its one decision
point fixes: greedy decoding answers 123456, the gold answer is 123457, and a switch to the rank-2 candidate after
"5" fixes it, while a switch at any other (certain) step cannot."""

from __future__ import annotations

import json
import math

from steer.analysis.headroom import HeadroomSettings, headroom
from steer.pipeline.problems import Problem


def test_headroom_finds_the_planted_decision_point(planted_choice, tokenizer, tmp_path):
    problems = [Problem(f"p{i}", f"Count {i}", "123457", "planted") for i in range(4)]
    settings = HeadroomSettings(max_new_tokens=12, tau=0.05, points=2, top_k=3, temperature=1.0, top_p=1.0,
                                batch_size=4, instruction="")
    report = headroom(planted_choice, tokenizer, problems, tmp_path, settings, progress=False)
    assert report.base_accuracy == 0.0 and report.failures == report.branched == 4
    assert report.tries_per_failure == 2  # one decision point, two alternatives (ranks 2 and 3)
    decision, random_arm, resample = (report.arms[arm] for arm in ("decision", "random", "resample"))
    assert decision.fixed_share == 1.0 and decision.try_success == 0.5  # rank 2 ("7") fixes, rank 3 does not
    assert random_arm.tries == decision.tries == resample.tries == 8
    assert random_arm.fixed == 0
    assert report.ceiling_accuracy == report.oracle_accuracy == 1.0
    assert report.rank_counts == {"2": 4}
    assert all(step.position == 5 and step.entropy > 0.05 for step in report.critical)
    assert report.median_entropy_percentile > 0.8
    p_seven = 1 / (1 + math.exp(2.0))
    assert resample.try_success <= 0.5 and abs(resample.try_success - p_seven) < 0.35
    assert json.loads((tmp_path / "headroom.json").read_text())["arms"]["decision"]["fixed"] == 4
    again = headroom(planted_choice, tokenizer, problems, tmp_path, settings, progress=False)  # resumes: nothing to do
    assert again == report
