"""`benches/onpolicy_diagnosis.py --engine vllm` traces vLLM's steered decodes after the fact: a teacher-forced
replay must record what transformers' generate, traced live, records for the same decode (the gate, the change, the
base candidates), and the changed steps it finds must give the same branches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from onpolicy_diagnosis import ChoiceFolder, choice_branches, diagnose, replayed_traces, teacher_forced_trace  # noqa: E402,E501

from steer.pipeline.decoding import Completion, DecodingSettings, decode_batch  # noqa: E402
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord  # noqa: E402
from steer.pipeline.problems import load_problems  # noqa: E402
from steer.pipeline.tracing import Tracer  # noqa: E402
from steer.processor import SteeringProcessor  # noqa: E402

GREEDY = DecodingSettings(temperature=0, max_new_tokens=24)


def record(problem_id: str, completion: Completion | None = None, tokenizer=None) -> PredictionRecord:
    """A steered record, of `completion` where given (its text, steps and live counts) or empty."""
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True) if completion else ""
    return PredictionRecord(benchmark="b", problem_id=problem_id, arm="steered", sample=0, completion=text,
                            answer=None, gold="7", correct=False,
                            finish_reason=completion.finish_reason if completion else "length",
                            steps=completion.steps if completion else 0, gated=completion.gated if completion else 0,
                            changed=completion.changed if completion else 0)


def test_teacher_forced_trace_is_the_live_trace(model_and_head, tokenizer):
    model, head = model_and_head
    prompts = [tokenizer(q)["input_ids"] for q in ("Q: 12+30?", "Q: 75+16?", "Q: 3+4=")]
    tracer = Tracer(lambda batch: SteeringProcessor(model, head, record_rows=True), top_k=head.top_k)
    completions = decode_batch(model, tokenizer, prompts, GREEDY, seed=0, processor=tracer)
    live = tracer.traces(completions)
    assert sum(int(t.changed.sum()) for t in live) > 0  # the comparison below covers changed steps

    replayed = {}
    for row, (prompt, completion, trace) in enumerate(zip(prompts, completions, live)):
        replay, agrees = teacher_forced_trace(model, head, prompt, completion.token_ids)
        assert agrees.all(), f"row {row}: the replayed steered top-1 is not the decoded token at {(~agrees).nonzero()}"
        assert replay.tokens.tolist() == trace.tokens.tolist()
        assert torch.equal(replay.gated, trace.gated) and torch.equal(replay.changed, trace.changed)
        assert torch.equal(replay.topk_ids, trace.topk_ids)
        torch.testing.assert_close(replay.entropy, trace.entropy, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(replay.steered_probs.float(), trace.steered_probs.float(), atol=2e-3, rtol=0)
        replayed[str(row)] = replay

    records = {str(row): record(str(row)) for row in range(len(prompts))}
    prompt_ids = {str(row): prompt for row, prompt in enumerate(prompts)}
    live_branches = choice_branches(records, {str(r): t for r, t in enumerate(live)}, prompt_ids, per_completion=2)
    assert [(b.key, b.prefix) for b in choice_branches(records, replayed, prompt_ids, per_completion=2)] == \
        [(b.key, b.prefix) for b in live_branches]
    for branch in live_branches:  # a head branch ends on the decoded token, a base branch on the base top-1
        problem_id, t, choice = branch.key
        trace = live[int(problem_id)]
        assert branch.prefix[-1] == (int(trace.tokens[t]) if choice == "head" else int(trace.topk_ids[t, 0]))
        assert branch.prefix[-1] != (int(trace.topk_ids[t, 0]) if choice == "head" else int(trace.tokens[t]))


def test_teacher_forced_trace_sees_a_token_the_head_did_not_choose(model_and_head, tokenizer):
    model, head = model_and_head
    prompt = tokenizer("Q: 12+30?")["input_ids"]
    completion = decode_batch(model, tokenizer, [prompt], GREEDY, seed=0, processor=lambda batch:
                              SteeringProcessor(model, head, record_rows=True))[0].token_ids
    replay, _ = teacher_forced_trace(model, head, prompt, completion)
    swapped = list(completion)
    swapped[3] = int(replay.topk_ids[3, 1]) if swapped[3] != int(replay.topk_ids[3, 1]) else int(replay.topk_ids[3, 2])
    _, agrees = teacher_forced_trace(model, head, prompt, swapped)
    assert not agrees[3] and agrees[:3].all()


def test_replay_of_records_counts_what_the_decode_did_and_branches_only_where_it_took_the_head(model_and_head,
                                                                                             tokenizer):
    model, head = model_and_head
    prompts = [tokenizer(q)["input_ids"] for q in ("Q: 12+30?", "Q: 75+16?", "Q: 40+2?", "Q: 9+13?")]
    completions = decode_batch(model, tokenizer, prompts, GREEDY, seed=0,
                               processor=lambda batch: SteeringProcessor(model, head, record_rows=True))
    # Records whose text re-tokenises to the decoded tokens (a decode may hold a special token the text drops).
    exact = [(str(row), c) for row, c in enumerate(completions)
             if tokenizer(record(str(row), c, tokenizer).completion, add_special_tokens=False)["input_ids"]
             == [t for t in c.token_ids if t != tokenizer.eos_token_id]]
    assert len(exact) >= 2 and sum(c.changed for _, c in exact) > 0
    prompt_ids = {str(row): prompt for row, prompt in enumerate(prompts)}
    traces, replay = replayed_traces(model, tokenizer, head, [record(r, c, tokenizer) for r, c in exact], prompt_ids)
    eos_steps = [c.finish_reason == "stop" and bool(c.gated) for _, c in exact]  # the replay lacks the EOS step
    assert replay.retokenised_to_another_length == 0 and replay.agreement_at_gated_steps == 1.0
    assert replay.live_changed >= replay.replayed_changed == replay.changed_where_decoded == \
        sum(int(t.changed.sum()) for t in traces.values()) > 0
    assert replay.live_gated >= replay.replayed_gated >= replay.live_gated - sum(eos_steps)

    # The decode took the base top-1 where the replay's head changes it: that step is no longer a changed step.
    problem_id, completion = next((r, c) for r, c in exact if int(traces[r].changed.sum()) > 0)
    t = int(traces[problem_id].changed.nonzero()[0])
    base_top1 = int(traces[problem_id].topk_ids[t, 0])
    forced = Completion("", completion.token_ids[:t] + [base_top1], "length")
    forced_traces, _ = replayed_traces(model, tokenizer, head, [record(problem_id, forced, tokenizer)], prompt_ids)
    forced_trace = forced_traces[problem_id]
    assert not forced_trace.changed[t] and torch.equal(forced_trace.changed[:t], traces[problem_id].changed[:t])
    assert all(branch.key[1] != t for branch in choice_branches({problem_id: record(problem_id)},
                                                                {problem_id: forced_trace}, prompt_ids, 9))


def test_diagnose_links_the_chain_from_its_own_folders(model_and_head, tokenizer, tmp_path, arithmetic_file):
    model, head = model_and_head
    problems = load_problems(arithmetic_file, limit=6)
    report = diagnose(model, tokenizer, head, tmp_path / "head", problems, tmp_path / "run", per_completion=2, seed=0,
                      max_new_tokens=12, engine="hf")
    records = PredictionFolder(tmp_path / "run" / "eval").records()
    steered = [r for r in records if r.arm == "steered"]
    choices = ChoiceFolder(tmp_path / "run" / "choices").read_records()
    assert report["problems"] == 6 and len(records) == 12
    assert report["change"]["changed_per_completion"] == sum(r.changed for r in steered) / 6 > 0
    assert report["choice"]["changed_steps_continued"] * 2 == len(choices) > 0
    assert len(choices) == 2 * sum(min(2, r.changed) for r in steered)  # both choices at up to 2 changed steps each
    assert report["choice"]["head_choice_succeeds"] * len(choices) / 2 == pytest.approx(
        sum(c.correct for c in choices if c.choice == "head"))
    assert report["outcome"]["steered_accuracy"] == sum(r.correct for r in steered) / 6 and "replay" not in report
