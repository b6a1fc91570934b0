"""The lm-evaluation-harness model type `steer`, run offline on a tiny model with local task definitions and data:
generation decodes as `steer.generate` does and scoring uses the steered distribution, where `hf` gives the base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import steer

lm_eval = pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed (pip install ".[lm_eval]")')
from lm_eval.tasks import TaskManager  # noqa: E402

from steer.integrations.lm_eval import SteerLM, SteerLMError, main  # noqa: E402

QUESTIONS = ["2+2=", "Say hi:", "Q: a b c?", "7*6="]
CHOICES = ["4", "5", "x", "y"]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def head_dir(model, tmp_path_factory) -> Path:
    """A head that gates every step (tau = 0) with a correction large enough to change tokens."""
    head = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=0.0, seed=0)
    with torch.no_grad():
        head.up.copy_(torch.randn(head.up.shape, generator=torch.Generator().manual_seed(1)) * 3.0)
    folder = tmp_path_factory.mktemp("head")
    head.save_pretrained(folder)
    return folder


def expected_completions(model, tokenizer, head: steer.CorrectionHead | None) -> list[str]:
    """What lm-eval should return for `QUESTIONS`: greedy decoding, steered with `head` (or not), cut at `until`."""
    completions = []
    for question in QUESTIONS:
        ids = tokenizer([question], return_tensors="pt", add_special_tokens=False)["input_ids"]
        kwargs = dict(input_ids=ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        out = steer.generate(model, head, **kwargs) if head is not None else model.generate(**kwargs)
        completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
    return completions


@pytest.fixture(scope="module")
def tasks(model, tokenizer, head_dir, tmp_path_factory) -> Path:
    """Two local tasks: `steer_gen` (generate_until, the targets are the steered completions) and `steer_choice`
    (multiple choice over one-character answers, scored by log-likelihood)."""
    folder = tmp_path_factory.mktemp("tasks")
    steered = expected_completions(model, tokenizer, steer.CorrectionHead.from_pretrained(head_dir))
    assert steered != expected_completions(model, tokenizer, None), "the test head must change some completion"
    with open(folder / "gen.jsonl", "w") as handle:
        for question, answer in zip(QUESTIONS, steered):
            handle.write(json.dumps({"question": question, "answer": answer}) + "\n")
    with open(folder / "choice.jsonl", "w") as handle:
        for i, question in enumerate(QUESTIONS):
            handle.write(json.dumps({"question": question, "choices": CHOICES, "label": i % len(CHOICES)}) + "\n")
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
    (folder / "steer_gen.yaml").write_text(
        f"task: steer_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_NEW_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "steer_choice.yaml").write_text(
        f"task: steer_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n")
    return folder


def evaluate(model_type: str, model_args: str, tasks: Path) -> dict:
    return lm_eval.simple_evaluate(
        model=model_type, model_args=f"{model_args},add_bos_token=False,device=cpu",
        tasks=["steer_gen", "steer_choice"], batch_size=1, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),  # ours only: faster
    )


def test_steered_and_base_numbers(tiny_model_dir, head_dir, tasks, model, tokenizer):
    base = evaluate("hf", f"pretrained={tiny_model_dir}", tasks)
    steered = evaluate("steer", f"pretrained={tiny_model_dir},head={head_dir}", tasks)

    # Generation: the steered run decodes exactly as steer.generate does (the targets), the base run does not.
    assert steered["results"]["steer_gen"]["exact_match,none"] == 1.0
    assert base["results"]["steer_gen"]["exact_match,none"] < 1.0
    steering = steered["config"]["steering"]
    assert steering["head"] == str(head_dir) and steering["generation"]["gated"] > 0

    # Scoring: each choice's log-likelihood is that of the steered next-token distribution (one token per choice).
    head = steer.CorrectionHead.from_pretrained(head_dir)
    for sample in steered["samples"]["steer_choice"]:
        ids = tokenizer([sample["doc"]["question"]], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with steer.SteeringProcessor(model, head) as processor, torch.no_grad():
            scores = processor(ids, model(ids).logits[:, -1, :])
        logprobs = torch.log_softmax(scores.float(), dim=-1)[0]
        expected = [logprobs[tokenizer.convert_tokens_to_ids(choice)].item() for choice in CHOICES]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)
    differences = [abs(s["resps"][0][0][0] - b["resps"][0][0][0]) for s, b in
                   zip(steered["samples"]["steer_choice"], base["samples"]["steer_choice"])]
    assert max(differences) > 1e-3
    assert steering["scoring"]["gated"] > 0


def test_steer_needs_a_head(tiny_model_dir):
    with pytest.raises(SteerLMError, match="needs a correction head"):
        SteerLM(pretrained=str(tiny_model_dir), device="cpu")


def test_steer_refuses_settings_it_cannot_steer(tiny_model_dir, head_dir):
    lm = SteerLM(pretrained=str(tiny_model_dir), head=str(head_dir), device="cpu", tau=0.5, top_k=3)
    assert (lm.head.tau, lm.head.top_k) == (0.5, 3)
    context = torch.tensor([[5, 6, 7]])
    with pytest.raises(steer.SteeringError, match="steering supports"):
        lm._model_generate(context, max_length=6, stop=["\n"], num_beams=4, num_beam_groups=2, diversity_penalty=1.0)


def test_python_m_command_runs_lm_eval_with_steer(tiny_model_dir, head_dir, tasks, tmp_path, monkeypatch):
    index = TaskManager.__init__  # lm-eval indexes its 14 000 built-in task files in about 10 s: only ours here
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *args, **kwargs: index(
        self, *args, **{**kwargs, "include_defaults": False}))
    monkeypatch.setattr(sys, "argv", ["steer.integrations.lm_eval"])
    main(["--model", "steer", "--model_args", f"pretrained={tiny_model_dir},head={head_dir},add_bos_token=False",
          "--device", "cpu", "--tasks", "steer_gen", "--include_path", str(tasks), "--output_path", str(tmp_path)])
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["results"]["steer_gen"]["exact_match,none"] == 1.0
