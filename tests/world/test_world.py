"""The built-in reasoning world: its problems, solutions, splits, benchmark file, and the shipped base model."""

from __future__ import annotations

import random
import re
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steer import world
from steer.pipeline.grading import extract_answer, grade
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import build_prompt

STEP = re.compile(r"(\d+)([<>])(\d+) so (\d+)\.")


def test_careful_solution_is_right_and_follows_the_format():
    for problem in world.problems("train", 50, seed=1):
        text = world.solution(problem)
        steps = STEP.findall(text)
        assert len(steps) == world.LIST_LENGTH - 1
        for a, sign, b, kept in steps:
            assert (sign == ">") == (int(a) > int(b)) and int(kept) == max(int(a), int(b))
        assert extract_answer(text) == str(problem.answer)


def test_sloppy_writer_errs_only_where_last_digits_mislead():
    """Corpus solutions differ from the careful one only at comparisons where the shortcut disagrees."""
    rng = random.Random(0)
    wrong = 0
    for problem in world.problems("train", 200, seed=2):
        for a, sign, b, _ in STEP.findall(world.solution(problem, rng)):
            a, b = int(a), int(b)
            if (sign == ">") != (a > b):
                wrong += 1
                assert world.sloppy_greater(a, b) == (sign == ">")
    assert wrong > 50  # SLOPPY_WEIGHT of the disagreeing comparisons


def test_splits_are_disjoint_seeded_and_distinct():
    train = world.problems("train", 300, seed=0)
    test = world.problems("test", 300, seed=0)
    assert not {p.numbers for p in train} & {p.numbers for p in test}
    assert len({p.numbers for p in test}) == 300 and all(p.split == "test" for p in test)
    assert world.problems("test", 300, seed=0) == test != world.problems("test", 300, seed=1)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        world.problems("dev", 1)


def test_benchmark_file_loads_and_grades_like_any_other(tmp_path):
    path = world.write_benchmark(tmp_path / "world.jsonl", count=20, seed=3)
    problems = load_problems(path)
    assert [p.question for p in problems] == [p.question for p in world.problems("test", 20, seed=3)]
    assert all(grade(world.solution(w), p.gold) for w, p in zip(world.problems("test", 20, seed=3), problems))


def test_shipped_model_and_tokenizer_load_offline_from_the_installed_package(monkeypatch):
    """The model folder lies inside the installed `steer` package and loads with the Auto classes, offline; its
    greedy solution of a problem is in the world's format."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = world.model_path()
    assert path == resources.files("steer.world") / "assets" / "world-model"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    problem = world.problems("test", 1, seed=5)[0]
    inputs = tokenizer([build_prompt(tokenizer, problem.question, world.INSTRUCTION)], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(STEP.findall(text)) == world.LIST_LENGTH - 1, text
    assert extract_answer(text) in {str(n) for n in problem.numbers}, text
