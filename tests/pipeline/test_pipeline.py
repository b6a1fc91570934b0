"""The offline pipeline end to end on a tiny model: rollouts (surviving kill -9), scoring, training, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import steer
from steer.cli.main import main
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.problems import load_problems
from steer.pipeline.rollout import RolloutSettings, run_rollouts
from steer.pipeline.scoring import ScoreSettings, score_rollouts
from steer.pipeline.store import RecordStore, StoreError, read_jsonl
from steer.pipeline.training import TrainSettings, train_head

SHORT = RolloutSettings(samples=3, decoding=DecodingSettings(max_new_tokens=10), batch_size=4, instruction="")


def parity_reward(completion: str, problem) -> float:
    """Stub reward: the tiny random model solves nothing, so the grader would give all zeros and training would
    rightly refuse the data; the parity of the completion's length gives the mixed rewards training needs."""
    return float(len(completion) % 2)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rollout_store_survives_kill_9(tiny_model_dir, arithmetic_file, tmp_path):
    out = tmp_path / "rollouts"
    command = [sys.executable, "-m", "steer", "rollout", "--model", str(tiny_model_dir), "--data",
               str(arithmetic_file), "--out", str(out), "--samples", "4", "--batch-size", "1",
               "--max-new-tokens", "24", "--instruction", "", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = out / "rollouts.jsonl"
    deadline = time.monotonic() + 120
    while not (store.exists() and store.read_text().count("\n") >= 5):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the rollout never wrote 5 records"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = store.read_text().count("\n")
    assert 5 <= written < 48, "the kill should land in the middle of the run"
    with store.open("a") as handle:  # what a kill during a write leaves behind
        handle.write('{"problem_id": "arithmetic-3", "sam')

    subprocess.run(command, env=env, check=True, capture_output=True)

    records = lines(store)
    keys = [(r["problem_id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)) == 12 * 4, "records lost or doubled"
    assert all({"prompt", "completion", "answer", "reward", "finish_reason", "completion_ids"} <= r.keys()
               for r in records)


def test_a_key_field_added_later_reads_as_its_default_in_older_records(tmp_path):
    """Records written before the key field `n` existed stand for n = 0: they are known by that key (a record with
    n = 0 is not written again, n = 1 is), while a record lacking a key field without a default is an error."""
    path = tmp_path / "store.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n')
    store = RecordStore(path, ("id", "n"), key_defaults={"n": 0})
    assert ("a", 0) in store and ("b", 0) in store and len(store) == 2
    store.extend([{"id": "a", "n": 0, "v": 9}, {"id": "a", "n": 1, "v": 3}])
    assert [(r["id"], r.get("n"), r["v"]) for r in lines(path)] == [("a", None, 1), ("b", None, 2), ("a", 1, 3)]
    assert len(RecordStore(path, ("id", "n"), key_defaults={"n": 0})) == 3
    with pytest.raises(StoreError, match=r"store.jsonl:1: record lacks n"):
        RecordStore(path, ("id", "n"))


def test_resuming_with_other_settings_is_refused(tiny_model_dir, arithmetic_file, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    problems = load_problems(arithmetic_file, limit=2)
    run_rollouts(model, tokenizer, problems, tmp_path, SHORT, progress=False)
    with pytest.raises(StoreError, match="samples: stored 3, now 5"):
        run_rollouts(model, tokenizer, problems, tmp_path, RolloutSettings(samples=5, instruction=""), progress=False)


def test_scores_match_the_entropy_seen_while_decoding(tiny_model_dir, arithmetic_file, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    problems = load_problems(arithmetic_file, limit=3)
    greedy = RolloutSettings(samples=1, decoding=DecodingSettings(temperature=0, max_new_tokens=8), instruction="")
    run_rollouts(model, tokenizer, problems, tmp_path, greedy, progress=False)
    summary = score_rollouts(model, tmp_path, ScoreSettings(floor=0.0, top_k=4, max_batch_tokens=40), progress=False)
    assert summary.scored == 3 and summary.tokens == 3 * 8

    index = list(read_jsonl(tmp_path / "scores" / "shards.jsonl"))
    shard = load_file(str(tmp_path / "scores" / index[0]["file"]))
    stats = {tuple(r["key"]): i for i, r in enumerate(index[0]["rollouts"])}
    for record in read_jsonl(tmp_path / "rollouts.jsonl"):
        row = stats[(record["problem_id"], record["sample"])]
        start, end = shard["offsets"][row], shard["offsets"][row + 1]
        ids = torch.tensor([record["prompt_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, ids.shape[1]:].tolist() == record["completion_ids"]
        live = steer.entropy_topk(torch.cat(out.logits), 4)
        torch.testing.assert_close(shard["entropy"][start:end], live.entropy, rtol=1e-4, atol=1e-4)
        mine = shard["point_rollout"] == row
        assert shard["point_position"][mine].tolist() == list(range(8))  # floor 0: every position stored
        assert shard["point_token"][mine].tolist() == record["completion_ids"]
        logprobs = torch.log_softmax(torch.cat(out.logits), -1)
        expected = logprobs.gather(-1, torch.tensor(record["completion_ids"]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(shard["point_token_logprob"][mine], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(shard["point_topk_logprobs"][mine], logprobs.topk(4).values, rtol=1e-4, atol=1e-4)


def test_pipeline_end_to_end_in_python(tiny_model_dir, arithmetic_file, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    problems = load_problems(arithmetic_file)
    summary = run_rollouts(model, tokenizer, problems, tmp_path, SHORT, reward_fn=parity_reward, progress=False)
    assert summary.total == 36 and 0 < summary.mean_reward < 1
    assert score_rollouts(model, tmp_path, progress=False).scored == 36
    assert score_rollouts(model, tmp_path, progress=False).scored == 0, "a second run has nothing left to score"

    # No held-out problems: the last step is kept (with held-out ones, a head that learns parity from a random model
    # would rightly keep its untrained weights)
    result = train_head(model, tmp_path, TrainSettings(tau_quantile=0.5, steps=12, eval_every=4, heldout_fraction=0),
                        progress=False)
    head_dir = result.save(tmp_path / "head")
    record = json.loads((head_dir / "training.json").read_text())
    assert record["pool"]["train_points"] > 0 and len(record["curve"]) == 12
    assert set(record["data"]) == {"rollouts_dir", "rollouts_sha256", "scores_sha256"}  # no labels: advantages
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in record["curve"])
    head = steer.CorrectionHead.from_pretrained(head_dir)
    assert head.tau == pytest.approx(record["tau"]) and head.config.tau_quantile == 0.5
    assert head.up.abs().sum() > 0, "training did not move the head"
    ids = torch.tensor([tokenizer("What is 1 + 2?")["input_ids"]])
    steer.generate(model, head, input_ids=ids, max_new_tokens=5)


def test_cli_pipeline_refuses_data_without_contrast(tiny_model_dir, arithmetic_file, tmp_path):
    runner = CliRunner()
    common = ["--model", str(tiny_model_dir), "--cpu", "--json"]
    result = runner.invoke(main, ["rollout", *common, "--data", str(arithmetic_file), "--out", str(tmp_path),
                                  "--samples", "2", "--max-new-tokens", "6", "--limit", "3", "--instruction", ""])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["total"] == 6
    result = runner.invoke(main, ["score", *common, "--rollouts", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["scored"] == 6
    result = runner.invoke(main, ["train", *common, "--rollouts", str(tmp_path), "--out", str(tmp_path / "head")])
    assert result.exit_code == 1 and "no contrast" in result.output and "Traceback" not in result.output
