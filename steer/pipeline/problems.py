"""Problems in: read math benchmarks (JSONL, JSON lists, parquet, Hugging Face datasets) into [`Problem`]s.

Question and answer fields are detected (GSM8K's `question`/`answer`, MATH's `problem`/`solution`/`answer`,
OlympiadBench's `final_answer`, ...) and can be named explicitly. Gold answers are normalised: GSM8K's `#### N`
becomes `N`, a MATH solution becomes its last `\\boxed{}`, a list of answers becomes a comma-separated string.
A broken line or a missing field raises [`ProblemFileError`] naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import SteerError
from steer.pipeline.grading import last_boxed

QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("final_answer", "answer", "solution", "target", "output")
ID_FIELDS = ("id", "problem_id", "unique_id", "idx")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class ProblemFileError(SteerError, ValueError):
    """A benchmark file (or dataset) that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Args:
        id (`str`): unique within its benchmark (the record's own id field, else its 0-based position).
        question (`str`): the question text, without instructions.
        gold (`str`): the normalised gold answer.
        benchmark (`str`): the benchmark's label (file stem or dataset name unless given).
        meta (`dict`): the record's other fields (level, type, ...), for analysis.
    """

    id: str
    question: str
    gold: str
    benchmark: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def normalize_gold(value: Any, field_name: str = "answer") -> str | None:
    """Normalise a gold answer: `#### N` -> `N`, a solution -> its last `\\boxed{}`, a list -> `a, b`, numbers
    -> their plain text (`3.0` -> `3`). Returns `None` when a `solution` field holds no boxed answer.

    Example:
    >>> normalize_gold("She pays 2 * 9 = 18.\\n#### 18")
    '18'
    >>> normalize_gold("So the answer is $\\\\boxed{\\\\frac{1}{2}}$.", "solution")
    '\\\\frac{1}{2}'
    """
    if isinstance(value, list):
        parts = [normalize_gold(v, field_name) for v in value]
        return None if not parts or None in parts else ", ".join(parts)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if field_name == "solution":
        return None
    return text or None


def load_problems(
    source: str | os.PathLike,
    question_field: str | None = None,
    answer_field: str | None = None,
    benchmark: str | None = None,
    limit: int | None = None,
    split: str = "test",
) -> list[Problem]:
    """Read a benchmark into problems.

    Args:
        source (`str` or `os.PathLike`): a `.jsonl`, `.json` (a list of objects) or `.parquet` file, or the name of a
            Hugging Face dataset (`name` or `name:config`; needs `pip install steer-lm[hub]` and a reachable hub).
        question_field, answer_field (`str`, *optional*): the fields to read; detected when not given.
        benchmark (`str`, *optional*): the label stored in each problem; defaults to the file stem or dataset name.
        limit (`int`, *optional*): keep only the first `limit` problems.
        split (`str`, defaults to `"test"`): the split of a Hugging Face dataset.

    Returns:
        `list[Problem]` in file order.

    Raises:
        [`ProblemFileError`]: unreadable file, broken line, missing field, duplicate id, no problems.

    Example:
    >>> problems = load_problems("gsm8k_test.jsonl", limit=100)  # doctest: +SKIP
    >>> problems[0].gold  # doctest: +SKIP
    '18'
    """
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        label, records = benchmark or path.stem, _file_records(path)
    else:
        label, records = benchmark or str(source), _dataset_records(str(source), split)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for where, record in records:
        if limit is not None and len(problems) >= limit:
            break
        problem = _problem(where, record, len(problems), label, question_field, answer_field)
        if problem.id in seen:
            raise ProblemFileError(f"{where}: duplicate id {problem.id!r} (first at {seen[problem.id]})")
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise ProblemFileError(f"{source}: no problems found")
    return problems


def _problem(where: str, record: Any, index: int, label: str, question_field: str | None,
             answer_field: str | None) -> Problem:
    if not isinstance(record, dict):
        raise ProblemFileError(f"{where}: expected a JSON object, found {type(record).__name__}")
    q_name = _field(where, record, question_field, QUESTION_FIELDS, "question", "--question-field")
    a_name = _answer_field(where, record, answer_field)
    question = record[q_name]
    if not isinstance(question, str) or not question.strip():
        raise ProblemFileError(f"{where}: field {q_name!r} is empty or not text")
    gold = normalize_gold(record[a_name], a_name)
    if gold is None:
        raise ProblemFileError(f"{where}: no usable gold answer in field {a_name!r} (value {record[a_name]!r:.80})")
    id_name = next((name for name in ID_FIELDS if record.get(name) is not None), None)
    problem_id = str(record[id_name]) if id_name else str(index)
    meta = {k: v for k, v in record.items() if k not in (q_name, a_name, id_name)}
    return Problem(problem_id, question.strip(), gold, label, meta)


def _field(where: str, record: dict, chosen: str | None, candidates: tuple[str, ...], what: str, option: str) -> str:
    if chosen is not None:
        if chosen not in record:
            raise ProblemFileError(f"{where}: no field {chosen!r} (fields: {', '.join(sorted(record))})")
        return chosen
    for name in candidates:
        if name in record:
            return name
    raise ProblemFileError(f"{where}: no {what} field (looked for {', '.join(candidates)}; fields: "
                           f"{', '.join(sorted(record))}); name it with {option}")


def _answer_field(where: str, record: dict, chosen: str | None) -> str:
    name = _field(where, record, chosen, ANSWER_FIELDS, "answer", "--answer-field")
    if chosen is None and name == "answer" and "solution" in record and not str(record["answer"]).strip():
        return "solution"  # MATH records with an empty `answer` carry it in the solution's last \boxed{}
    return name


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise ProblemFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_list_records(path, text)
    return _jsonl_records(path, text)


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ProblemFileError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        yield f"{path}:{number}", record


def _json_list_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        position = _skip(text, position, ",")
        if position >= len(text):
            raise ProblemFileError(f"{path}:{text.count(chr(10)) + 1}: the JSON list is not closed")
        if text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ProblemFileError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") \
                from None
        yield f"{path}:{line}", record


def _skip(text: str, position: int, separators: str) -> int:
    while position < len(text) and (text[position].isspace() or text[position] in separators):
        position += 1
    return position


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise ProblemFileError(f"{path}: not a readable parquet file ({error})") from None
    for row, record in enumerate(table.to_pylist()):
        yield f"{path}: row {row}", record


def _dataset_records(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ProblemFileError(f"{name}: not a file; reading Hugging Face datasets needs `pip install steer-lm[hub]`") \
            from None
    dataset_name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as error:  # offline, unknown name, missing split: all reported the same way
        raise ProblemFileError(f"{name}: not a file, and the Hugging Face dataset could not be loaded "
                               f"(split {split!r}): {error}") from None
    for row, record in enumerate(dataset):
        yield f"{name}[{split}]: row {row}", record
