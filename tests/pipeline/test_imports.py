"""Rollouts from another engine: imported, tokenised and graded, then scored and trained on like sampled ones."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from steer.cli.main import main
from steer.models import load_model
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.imports import RolloutImportError, import_rollouts
from steer.pipeline.problems import Problem
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.scoring import score_rollouts


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_imported_rollouts_are_tokenised_graded_and_scored(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    prompt = build_prompt(tokenizer, "What is 2 + 2?")
    source = write_jsonl(tmp_path / "engine.jsonl", [
        {"problem_id": "a", "prompt": prompt, "completion": "It is \\boxed{4}."},             # graded against --data
        {"problem_id": "a", "prompt": prompt, "completion": "It is \\boxed{5}."},
        {"problem_id": "b", "question": "What is 3 + 3?", "completion": "6", "reward": 0.5},   # reward given
        {"problem_id": "c", "prompt_ids": [5, 6, 7], "completion": "7", "completion_ids": [9, 1], "gold": "7"},
    ])
    problems = {"a": Problem("a", "What is 2 + 2?", "4", "toy")}
    assert import_rollouts(tokenizer, source, tmp_path / "r", model_name="tiny", problems=problems) == 4
    records = {r.key: r for r in RolloutFolder(tmp_path / "r").read_records()}
    assert [records["a", 0].reward, records["a", 1].reward, records["b", 0].reward] == [1.0, 0.0, 0.5]
    assert records["a", 0].prompt_ids == encode_prompt(tokenizer, prompt)
    assert records["b", 0].prompt == build_prompt(tokenizer, "What is 3 + 3?")
    assert records["c", 0].completion_ids == [9, 1] and records["c", 0].num_tokens == 2
    assert records["a", 1].completion_ids == tokenizer("It is \\boxed{5}.", add_special_tokens=False)["input_ids"]
    assert score_rollouts(model, tmp_path / "r", progress=False).scored == 4
    assert import_rollouts(tokenizer, source, tmp_path / "r", model_name="tiny", problems=problems) == 4  # again


def test_import_names_the_record_that_lacks_a_prompt_or_a_grade(tiny_model_dir, tmp_path):
    _, tokenizer = load_model(tiny_model_dir)
    no_prompt = write_jsonl(tmp_path / "a.jsonl", [{"problem_id": "a", "completion": "4", "reward": 1}])
    with pytest.raises(RolloutImportError, match=r"a.jsonl:1: a rollout needs its prompt"):
        import_rollouts(tokenizer, no_prompt, tmp_path / "r1", model_name="tiny")
    no_grade = write_jsonl(tmp_path / "b.jsonl", [{"problem_id": "z", "question": "?", "completion": "4"}])
    result = CliRunner().invoke(main, ["import-rollouts", "-m", str(tiny_model_dir), "--from", str(no_grade),
                                       "-o", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "b.jsonl:1: no reward and no gold answer" in result.output
