"""`steer eval`: the summary's numbers, paired arms end to end, resuming, and several processes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from steer import CorrectionHead, world
from steer.cli.main import main
from steer.models import load_model
from steer.pipeline.folders.predictions import PredictionRecord
from steer.pipeline.metrics import wilson_interval
from steer.pipeline.summary import PairedTest, summarize

KEY = ("benchmark", "problem_id", "arm", "sample")


def record(problem: str, arm: str, sample: int, correct: bool) -> PredictionRecord:
    return PredictionRecord(benchmark="b", problem_id=problem, arm=arm, sample=sample, completion="", answer=None,
                            gold="1", correct=correct, finish_reason="stop", steps=10,
                            gated=1 if arm == "steered" else 0, changed=0)


def test_summary_of_single_samples_and_paired_test():
    base = [True, False, False, True, False]
    steered = [True, True, True, False, False]
    records = [record(str(i), arm, 0, ok) for arm, outcome in (("base", base), ("steered", steered))
               for i, ok in enumerate(outcome)]
    summary = summarize(records, samples=1).benchmarks["b"]
    arms = summary.arms
    assert arms["base"].accuracy == 0.4 and arms["steered"].accuracy == 0.6
    assert arms["base"].interval_95 == pytest.approx(wilson_interval(2, 5))
    assert arms["steered"].gated_fraction == 0.1 and arms["base"].gated_fraction == 0.0
    paired = summary.paired["steered"]
    assert (paired.gained, paired.lost, paired.difference) == (2, 1, pytest.approx(0.2))
    assert paired.p_value == pytest.approx(1.0)  # 2 against 1 discordant pairs: exact two-sided p = 1


def test_summary_pass_at_k_matches_a_brute_force_count():
    outcomes = {"p0": [True, False, False, False], "p1": [False, False, False, False], "p2": [True, True, False, True]}
    records = [record(p, "base", s, ok) for p, draws in outcomes.items() for s, ok in enumerate(draws)]
    summary = summarize(records, samples=4).benchmarks["b"].arms["base"]
    assert summary.accuracy == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    for k in (1, 2, 4):
        brute = [sum(any(subset) for subset in itertools.combinations(draws, k)) /
                 len(list(itertools.combinations(draws, k))) for draws in outcomes.values()]
        assert summary.pass_at_k[str(k)] == pytest.approx(sum(brute) / 3)
    low, high = summary.interval_95
    assert low <= summary.accuracy <= high


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    """The built-in world's model (a real trained model, fast) with a head that gates every step but adds zero,
    and a benchmark of 6 test problems."""
    folder = tmp_path_factory.mktemp("world-eval")
    model, _ = load_model(world.model_path())
    CorrectionHead.for_model(model, tau=0.0).save_pretrained(folder / "head")
    return world.write_benchmark(folder / "world.jsonl", count=6), folder / "head"


def run_eval(out, data, *extra: str) -> dict:
    args = ["eval", "-m", str(world.model_path()), "-d", f"world={data}", "-o", str(out), "--max-new-tokens", "60",
            "--instruction", "", "--json", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def predictions(out) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    table = {tuple(row[k] for k in KEY): row for row in rows}
    assert len(table) == len(rows)
    return table


def test_eval_end_to_end_with_and_without_a_head(world_files, tmp_path):
    """Every (problem, sample) is present in each arm; the arms share their seeds, so a head that adds zero gives
    the base completions exactly (sampling at temperature 0.6), while its counters show it gated every step."""
    data, head = world_files
    plain = run_eval(tmp_path / "plain", data, "--samples", "2")
    plain_arms = plain["benchmarks"]["world"]["arms"]
    assert set(plain_arms) == {"base"} and plain_arms["base"]["predictions"] == 12
    summary = run_eval(tmp_path / "steered", data, "--samples", "2", "--head", str(head))
    table = predictions(tmp_path / "steered")
    problems = {key[1] for key in table}
    assert len(problems) == 6 and set(table) == {("world", p, arm, s) for p in problems for arm in ("base", "steered")
                                                 for s in range(2)}
    for (bench, problem, arm, sample), row in table.items():
        assert {"completion", "answer", "gold", "correct", "steps", "gated", "changed"} <= set(row)
        if arm == "steered":
            base = table[bench, problem, "base", sample]
            assert row["completion"] == base["completion"] and row["gated"] == row["steps"] > 0
            assert row["changed"] == 0 and base["gated"] == 0
    # the base arm does not depend on whether a head is evaluated beside it
    assert {k: r["completion"] for k, r in predictions(tmp_path / "plain").items()} == {
        k: r["completion"] for k, r in table.items() if k[2] == "base"}
    world_summary = summary["benchmarks"]["world"]
    assert world_summary["paired"]["steered"]["difference"] == 0
    assert world_summary["arms"]["steered"]["gated_fraction"] == 1.0


def test_eval_resumes_after_an_interruption(world_files, tmp_path):
    """A run cut off mid-write (five whole records and half of the sixth) resumes: the records written are kept,
    only the batches with missing records are decoded again, and the result is the uninterrupted run's."""
    data, head = world_files
    options = ("--head", str(head), "--temperature", "0", "--batch-size", "2")  # batches of 2 problems x 2 arms
    full = run_eval(tmp_path / "full", data, *options)
    path = tmp_path / "cut" / "predictions.jsonl"
    run_eval(tmp_path / "cut", data, *options)
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:5]
    path.write_text("".join(kept) + lines[5][: len(lines[5]) // 2])
    resumed = run_eval(tmp_path / "cut", data, *options)
    assert predictions(tmp_path / "cut") == predictions(tmp_path / "full")
    assert [json.loads(line) for line in path.read_text().splitlines()[:5]] == [json.loads(line) for line in kept]
    assert 0 < resumed["run"]["tokens"] < full["run"]["tokens"]
    assert resumed["benchmarks"] == full["benchmarks"]


@pytest.mark.slow
def test_two_processes_give_the_greedy_completions_of_one(world_files, tmp_path):
    """`torchrun` with two CPU processes: each takes a share, the main one merges; the same files as one process."""
    data, head = world_files
    single = run_eval(tmp_path / "one", data, "--head", str(head), "--temperature", "0", "--batch-size", "2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "steer",
               "eval", "-m", str(world.model_path()), "-d", f"world={data}", "-o", str(tmp_path / "two"),
               "--max-new-tokens", "60", "--instruction", "", "--head", str(head), "--temperature", "0",
               "--batch-size", "2", "--cpu", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two["run"]["processes"] == 2 and two["run"]["tokens"] == single["run"]["tokens"]
    assert predictions(tmp_path / "two") == predictions(tmp_path / "one")
    assert two["benchmarks"] == single["benchmarks"]
    assert not list((tmp_path / "two" / "parts").glob("*.jsonl"))  # merged and removed


def test_the_verdict_is_plain_about_a_head_that_hurts():
    assert "HURT" in PairedTest("mcnemar", 100, -0.06, 0.3).verdict()
    assert "significantly" in PairedTest("mcnemar", 100, -0.2, 0.001).verdict()
    assert "helped" in PairedTest("mcnemar", 100, 0.2, 0.001).verdict()
    assert "noise" in PairedTest("mcnemar", 100, 0.03, 0.45).verdict()


def test_tune_from_the_command_line_switches_off_a_head_that_changes_nothing(world_files, tmp_path):
    """A head that adds zero decodes as the base model at every strength: no strength beats base by a standard
    error, so `steer tune` keeps strength 0 and says so; the strengths' decodes are in OUT like `steer eval`'s."""
    data, head = world_files
    args = ["tune", "-m", str(world.model_path()), "--head", str(head), "-d", f"world={data}", "-o",
            str(tmp_path / "tune"), "--max-new-tokens", "60", "--instruction", "", "--scales", "1,4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "switched off" in result.output and "x4" in result.output
    tuned = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout.strip().splitlines()[-1])
    assert tuned["scale"] == 0.0 and [o["scale"] for o in tuned["outcomes"]] == [0.0, 1.0, 4.0]
    assert len({o["accuracy"] for o in tuned["outcomes"]}) == 1
    arms = {key[2] for key in predictions(tmp_path / "tune")}
    assert arms == {"base", "x1", "x4"}
    assert CorrectionHead.from_pretrained(tmp_path / "tune" / "head").scale == 0.0
