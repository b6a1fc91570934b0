"""Bring your own rollouts: completions sampled by another engine (vLLM, SGLang, ...) turned into a rollouts folder
that `steer score` and `steer train` read unchanged.

An input record (one JSON object per line) needs:

- `problem_id` (`str`): the problem it answers;
- `completion` (`str`): the generated text;
- the prompt, as `prompt` (the exact text the engine continued, chat template applied) or `prompt_ids`
  (`list[int]`), or as `question` (then the prompt is built here with the model's chat template and `instruction`).

Optional: `sample` (`int`; by default the record's order among its problem's records), `completion_ids`
(`list[int]`; by default the completion re-tokenised), `reward` (`float`; by default graded against the gold answer:
the record's `gold`, or the problem's in `problems`), `finish_reason` (`"stop"`/`"length"`, default `"stop"`),
`benchmark`. The rollouts must come from the model that will score them: scoring teacher-forces that model over the
same tokens.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from steer.errors import SteerError
from steer.pipeline.folders.rollouts import RolloutFolder, RolloutRecord
from steer.pipeline.grading import extract_answer, grade
from steer.pipeline.problems import Problem
from steer.pipeline.prompts import DEFAULT_INSTRUCTION, build_prompt, encode_prompt
from steer.pipeline.store import check_settings, read_jsonl


class RolloutImportError(SteerError, ValueError):
    """An input rollout lacks what a rollout needs; the message names the file and record."""


def import_rollouts(
    tokenizer: PreTrainedTokenizerBase,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str,
    problems: Mapping[str, Problem] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> int:
    """Convert the rollouts of a JSONL file (fields: see the module docstring) into the rollouts folder `out_dir`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer of the model that sampled them.
        source (`str` or `os.PathLike`): the JSONL file.
        out_dir (`str` or `os.PathLike`): the rollouts folder (records already there are kept, not written twice).
        model_name (`str`): the model's name or path, recorded in the folder's settings.
        problems (`Mapping[str, Problem]`, *optional*): gold answers by problem id, for records without `reward`
            or `gold`.
        instruction (`str`): appended to `question` where a record gives a question instead of a prompt.

    Returns:
        The number of records in the folder.

    Example:

    ```python
    >>> import_rollouts(tokenizer, "vllm.jsonl", "runs/rollouts", model_name="Qwen/Qwen2.5-1.5B")  # doctest: +SKIP
    ```
    """
    folder = RolloutFolder(out_dir)
    check_settings(folder.settings_path, {"model": model_name, "imported_from": Path(source).name})
    samples: dict[str, int] = defaultdict(int)
    records = []
    for number, raw in enumerate(read_jsonl(source, ("problem_id", "completion")), start=1):
        where = f"{source}:{number}"
        problem_id = str(raw["problem_id"])
        sample = int(raw.get("sample", samples[problem_id]))
        samples[problem_id] = sample + 1
        records.append(_rollout(raw, where, problem_id, sample, tokenizer, problems or {}, instruction))
    store = folder.store()
    store.extend([record.to_json() for record in records])
    return len(store)


def _rollout(raw: dict[str, Any], where: str, problem_id: str, sample: int, tokenizer: PreTrainedTokenizerBase,
             problems: Mapping[str, Problem], instruction: str) -> RolloutRecord:
    prompt, prompt_ids = _prompt(raw, where, tokenizer, instruction)
    if not prompt_ids:
        raise RolloutImportError(f"{where}: the prompt is empty (scoring needs logits that predict the completion)")
    completion = raw["completion"]
    completion_ids = raw.get("completion_ids") or tokenizer(completion, add_special_tokens=False)["input_ids"]
    gold = raw.get("gold", problems[problem_id].gold if problem_id in problems else None)
    if "reward" not in raw and gold is None:
        raise RolloutImportError(f"{where}: no reward and no gold answer for problem {problem_id!r}: give `reward` "
                                 "or `gold` in the record, or the benchmark (--data)")
    return RolloutRecord(
        problem_id=problem_id, sample=sample,
        benchmark=raw.get("benchmark", problems[problem_id].benchmark if problem_id in problems else ""),
        gold=gold, prompt=prompt, prompt_ids=[int(i) for i in prompt_ids], completion=completion,
        completion_ids=[int(i) for i in completion_ids], answer=extract_answer(completion),
        reward=float(raw["reward"]) if "reward" in raw else float(grade(completion, gold)),
        finish_reason=raw.get("finish_reason", "stop"), num_tokens=len(completion_ids),
    )


def _prompt(raw: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase,
            instruction: str) -> tuple[str, Sequence[int]]:
    if "prompt_ids" in raw:
        ids = raw["prompt_ids"]
        return raw.get("prompt", tokenizer.decode(ids)), ids
    if "prompt" in raw:
        return raw["prompt"], encode_prompt(tokenizer, raw["prompt"])
    if "question" in raw:
        prompt = build_prompt(tokenizer, raw["question"], instruction)
        return prompt, encode_prompt(tokenizer, prompt)
    raise RolloutImportError(f"{where}: a rollout needs its prompt: give `prompt`, `prompt_ids` or `question`")
