"""Branch labels on the planted model (`planted_choice` in conftest): at its one decision point (after "5") the
rank-2 candidate "7" leads to the gold answer 123457 and the favoured "6" does not. Labels must say exactly that,
and a head trained on them must make greedy decoding choose "7"."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch

import steer
from steer.pipeline import labels as labels_module
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.folders.labels import LabelFolder
from steer.pipeline.folders.scores import Features
from steer.pipeline.labels import LabelSettings, label_branches, labelled_rows
from steer.pipeline.problems import Problem
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import ScoreSettings, score_rollouts
from steer.pipeline.store import StoreError
from steer.pipeline.training import TrainSettings, train_head
from steer.pipeline.tuning import tune_strength
from steer.settings import TuneSettings

PLANTED_LABELS = LabelSettings(tau=0.05, points=1, top_k=3, pool_problems=6, max_new_tokens=12, batch_size=16)


@pytest.fixture(scope="module")
def labelled(planted_choice, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    problems = [Problem(f"p{i}", f"Count {i}", "123457", "planted") for i in range(6)]
    sampled = RolloutSettings(samples=12, batch_size=24, instruction="",
                              decoding=DecodingSettings(temperature=1.5, top_p=1.0, max_new_tokens=12))
    run_rollouts(planted_choice, tokenizer, problems, folder, sampled, progress=False)
    score_rollouts(planted_choice, folder, ScoreSettings(floor=0.01, top_k=4), progress=False)
    summary = label_branches(planted_choice, tokenizer, folder, PLANTED_LABELS, progress=False)
    return folder, summary


def test_branch_labels_give_each_candidate_its_own_success(labelled, tokenizer):
    folder, summary = labelled
    success = LabelFolder.of(folder).success()
    assert summary.points == len(success) > 0 and summary.branches == 3 * summary.points
    five = tokenizer.convert_tokens_to_ids("5")
    for (problem_id, sample, _), rates in success.items():
        assert rates == [0.0, 1.0, 0.0], (problem_id, sample, rates)  # "6" fails, "7" succeeds, rank 3 junk fails
    records = LabelFolder.of(folder).read_records()
    assert {r.token for r in records if r.rank == 2} == {tokenizer.convert_tokens_to_ids("7")}
    assert all(position == 5 for _, _, position in success) and five != tokenizer.convert_tokens_to_ids("7")


def test_an_older_labels_folder_resumes_as_labelled_at_the_first_points(labelled, planted_choice, tokenizer,
                                                                         tmp_path):
    """A labels folder written before `placement`, `continuations`, `temperature`, `top_p` and the `continuation`
    key field existed (its settings and records stripped of them) was labelled at the first points with one greedy
    continuation (sampled ones were drawn at T 0.6, top-p 0.95): it reads the same, resumes with nothing left to do,
    and refuses other settings."""
    folder, summary = labelled
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    labels = LabelFolder.of(old)
    stored = json.loads(labels.settings_path.read_text())
    assert [stored.pop(name) for name in ("placement", "continuations", "temperature", "top_p")] == ["first", 1,
                                                                                                     0.6, 0.95]
    labels.settings_path.write_text(json.dumps(stored))
    lines = [json.loads(line) for line in labels.records_path.read_text().splitlines()]
    assert all(line.pop("continuation") == 0 for line in lines)
    labels.records_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert labels.recorded_settings()["placement"] == "first"
    assert labels.success() == LabelFolder.of(folder).success()
    resumed = label_branches(planted_choice, tokenizer, old, PLANTED_LABELS, progress=False)
    assert resumed.branches == 0 and resumed.points == summary.points
    assert len(labels.records_path.read_text().splitlines()) == len(lines)  # nothing written twice
    labels.records_path.write_text("".join(json.dumps(line) + "\n" for line in lines[:-2]))  # an interrupted run
    resumed = label_branches(planted_choice, tokenizer, old, PLANTED_LABELS, progress=False)
    assert resumed.branches == 2 and labels.success() == LabelFolder.of(folder).success()
    written = [json.loads(line) for line in labels.records_path.read_text().splitlines()]
    assert [line.get("continuation") for line in written[-3:]] == [None, 0, 0]  # only the two missing, new format
    with pytest.raises(StoreError, match="placement: stored 'first', now 'random'"):
        label_branches(planted_choice, tokenizer, old, replace(PLANTED_LABELS, placement="random"), progress=False)
    with pytest.raises(StoreError, match="continuations: stored 1, now 2"):
        label_branches(planted_choice, tokenizer, old, replace(PLANTED_LABELS, continuations=2), progress=False)
    with pytest.raises(StoreError, match="temperature: stored 0.6, now 0.8"):
        label_branches(planted_choice, tokenizer, old, replace(PLANTED_LABELS, temperature=0.8), progress=False)


def test_sampled_continuations_label_each_candidate_by_its_share_of_right_answers(labelled, planted_choice,
                                                                                    tokenizer, tmp_path, monkeypatch):
    """Three sampled continuations per candidate (at the settings' T 0.8 and top-p 0.9, seeded by key): three
    records each, the label their share graded right; on the planted model "7" still leads to the gold answer far
    more often than "6"."""
    folder, _ = labelled
    sampled = tmp_path / "sampled"
    shutil.copytree(folder, sampled, ignore=shutil.ignore_patterns("labels"))
    settings = replace(PLANTED_LABELS, continuations=3, temperature=0.8, top_p=0.9)
    decoded, decodings = [], set()
    continue_branches = labels_module.continue_branches

    def recording(model, tok, batch, decoding, *rest):  # the real decoding, noting what it was given
        decoded.extend(batch)
        decodings.add((decoding.temperature, decoding.top_p))
        return continue_branches(model, tok, batch, decoding, *rest)

    monkeypatch.setattr(labels_module, "continue_branches", recording)
    summary = label_branches(planted_choice, tokenizer, sampled, settings, progress=False)
    assert summary.branches == 3 * 3 * summary.points > 0
    assert all(branch.sampled for branch in decoded) and len({b.key for b in decoded}) == len(decoded)
    assert decodings == {(0.8, 0.9)}
    assert LabelFolder.of(sampled).recorded_settings()["temperature"] == 0.8
    records = LabelFolder.of(sampled).read_records()
    assert set(Counter((r.point, r.rank) for r in records).values()) == {3}
    assert sorted({r.continuation for r in records}) == [0, 1, 2]
    success = LabelFolder.of(sampled).success()
    assert len(success) == summary.points
    rates = torch.tensor(list(success.values()))
    assert rates[:, 1].mean() > rates[:, 0].mean() + 0.5
    again = label_branches(planted_choice, tokenizer, sampled, settings, progress=False)  # resumes: nothing left
    assert again.branches == 0


def test_a_point_with_continuations_missing_is_left_out(tmp_path):
    """Two candidates, two continuations each: a point with one continuation missing, with one only for every
    candidate (an even but interrupted run), or with a whole candidate missing, is left out."""
    labels = LabelFolder.of(tmp_path)
    labels.path.mkdir()
    labels.settings_path.write_text(json.dumps({"continuations": 2, "top_k": 2}))
    rows = [("a", 1, 0, True), ("a", 1, 1, False), ("a", 2, 0, False), ("a", 2, 1, False),  # complete
            ("b", 1, 0, True), ("b", 1, 1, True), ("b", 2, 0, False),  # rank 2 lacks a continuation
            ("c", 1, 0, True), ("c", 2, 0, False),  # each rank lacks one
            ("d", 1, 0, True), ("d", 1, 1, False)]  # rank 2 not written yet
    with labels.records_path.open("w") as out:
        for problem, rank, continuation, correct in rows:
            out.write(json.dumps({"problem_id": problem, "sample": 0, "position": 3, "rank": rank, "token": rank,
                                  "completion": "", "correct": correct, "continuation": continuation}) + "\n")
    assert labels.success() == {("a", 0, 3): [0.5, 0.0]}


def synthetic_features(points_per_rollout: list[int]) -> Features:
    """Features of rollouts with the given numbers of decision points, at positions 0, 1, ... (entropy 1)."""
    rollout = torch.cat([torch.full((n,), r) for r, n in enumerate(points_per_rollout)])
    position = torch.cat([torch.arange(n) for n in points_per_rollout])
    total = len(rollout)
    return Features(keys=[(f"p{r}", 0) for r in range(len(points_per_rollout))],
                    entropy=[torch.ones(n) for n in points_per_rollout], point_rollout=rollout,
                    point_position=position, point_entropy=torch.ones(total),
                    point_topk_ids=torch.zeros(total, 3, dtype=torch.long), point_topk_logprobs=torch.zeros(total, 3),
                    point_token=torch.zeros(total, dtype=torch.long), point_token_logprob=torch.zeros(total),
                    point_hidden=torch.zeros(total, 4), floor=0.0, embedding_fingerprint=[])


def test_label_placement_first_or_a_seeded_draw_among_all_decision_points():
    features = synthetic_features([12, 1, 12])

    def rows(**settings) -> list[tuple[int, int]]:  # (rollout, position) of each labelled row
        chosen = labelled_rows(features, 0.5, LabelSettings(points=2, **settings))
        return [(int(features.point_rollout[r]), int(features.point_position[r])) for r in chosen]

    assert rows() == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    drawn = [rows(placement="random", seed=seed) for seed in range(6)]
    for chosen in drawn:  # two points per rollout (the one with a single point: that one), in order
        assert [r for r, _ in chosen] == [0, 0, 1, 2, 2] and chosen == sorted(chosen)
    assert drawn[0] == rows(placement="random", seed=0)  # seeded: the same draw again
    later = [p for chosen in drawn for r, p in chosen if r != 1]
    assert max(later) >= 4 and len(set(map(tuple, drawn))) > 1  # from all of a rollout's points, varying by seed
    with pytest.raises(ValueError, match="placement must be one of first, random"):
        LabelSettings(placement="middle")
    with pytest.raises(ValueError, match="continuations must be at least 1"):
        LabelSettings(continuations=0)
    with pytest.raises(ValueError, match="3 sampled continuations need temperature > 0"):
        LabelSettings(continuations=3, temperature=0.0)
    assert LabelSettings(temperature=0.0).temperature == 0.0  # one greedy continuation: no sampling to set


@pytest.fixture(scope="module")
def branch_head(labelled, planted_choice):
    folder, _ = labelled
    settings = TrainSettings(labels="branches", tau=0.05, top_k=2, rank=4, steps=60, warmup_steps=5, lr=0.05,
                             eval_every=10, rollouts_per_step=16, kl_weight=0.0, keep_shortest=1.0,
                             heldout_fraction=0.5)  # three held-out problems: one gives no standard error
    return train_head(planted_choice, folder, settings, progress=False)


def test_a_head_trained_on_branch_labels_takes_the_better_branch(branch_head, planted_choice, tokenizer):
    result = branch_head
    assert result.record.settings.labels == "branches" and result.record.pool.train_points > 0
    labels_file = LabelFolder.of(result.record.data["rollouts_dir"]).records_path
    assert result.record.data["labels_sha256"] == hashlib.sha256(labels_file.read_bytes()).hexdigest()
    prompt = tokenizer("<|user|>Count 9<|assistant|>", add_special_tokens=False, return_tensors="pt")
    plain = planted_choice.generate(**prompt, do_sample=False, max_new_tokens=12)
    steered = steer.generate(planted_choice, result.head, **prompt, do_sample=False, max_new_tokens=12)
    decode = lambda ids: tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)  # noqa: E731
    assert (decode(plain), decode(steered)) == ("123456", "123457")
    assert torch.isfinite(torch.tensor([step.loss for step in result.record.curve])).all()


def test_tuning_keeps_the_smallest_strength_that_decodes_as_well_as_the_best(branch_head, planted_choice,
                                                                              tokenizer, tmp_path):
    """Held-out problems decoded at each strength: too weak a head still answers 123456 (wrong), the trained
    strength and four times it answer 123457; the smaller of those is kept. A head that never helps is switched
    off (strength 0, the base model)."""
    head = branch_head.head
    problems = {"planted": [Problem(f"q{i}", f"Count {i}", "123457", "planted") for i in range(4)]}
    weak = head.scale * 1e-3
    settings = TuneSettings(scales=(4 * head.scale, head.scale, weak), batch_size=8, instruction="",
                            decoding=DecodingSettings(temperature=0.0, max_new_tokens=12))
    result = tune_strength(planted_choice, tokenizer, head, problems, tmp_path / "tune", settings, progress=False)
    accuracy = {o.scale: o.accuracy for o in result.outcomes}
    assert accuracy == {0.0: 0.0, weak: 0.0, head.scale: 1.0, 4 * head.scale: 1.0}
    assert [o.scale for o in result.outcomes] == [0.0, weak, head.scale, 4 * head.scale]
    assert result.scale == head.scale and not result.switched_off
    assert steer.CorrectionHead.from_pretrained(tmp_path / "tune" / "head").scale == head.scale
    assert json.loads((tmp_path / "tune" / "tune.json").read_text())["scale"] == head.scale
    off = tune_strength(planted_choice, tokenizer, head, problems, tmp_path / "off",
                        TuneSettings(scales=(weak,), batch_size=8, instruction="", decoding=settings.decoding),
                        progress=False)
    assert off.switched_off and steer.CorrectionHead.from_pretrained(tmp_path / "off" / "head").scale == 0.0
