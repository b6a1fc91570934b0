"""`benches/onpolicy_diagnosis.py --engine vllm` traces vLLM's steered decodes after the fact: a teacher-forced
replay must record what transformers' generate, traced live, records for the same decode (the gate, the change, the
base candidates), and the changed steps it finds must give the same branches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from onpolicy_diagnosis import choice_branches, teacher_forced_trace  # noqa: E402

from steer.pipeline.decoding import DecodingSettings, decode_batch  # noqa: E402
from steer.pipeline.folders.predictions import PredictionRecord  # noqa: E402
from steer.pipeline.tracing import Tracer  # noqa: E402
from steer.processor import SteeringProcessor  # noqa: E402

GREEDY = DecodingSettings(temperature=0, max_new_tokens=24)


def record(problem_id: str) -> PredictionRecord:
    return PredictionRecord(benchmark="b", problem_id=problem_id, arm="steered", sample=0, completion="", answer=None,
                            gold="7", correct=False, finish_reason="length", steps=0, gated=0, changed=0)


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
