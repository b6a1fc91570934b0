"""The benchmark loader on hand-made files of every format, including broken ones."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steer.pipeline.problems import ProblemFileError, load_problems, normalize_gold

GSM8K = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
         {"question": "A pen costs $1,200 ... total?", "answer": "So 1,200.\n#### 1,200"}]
MATH = [{"problem": "Compute $1/2 + 0$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3"},
        {"problem": "What is $2+2$?", "solution": "Clearly $\\boxed{4}$.", "answer": "4", "unique_id": "test/a/1"}]
OLYMPIAD = [{"id": 17, "question": "Roots of $x^2=1$?", "final_answer": ["-1", "1"]}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_gsm8k_jsonl(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K))
    assert [p.gold for p in problems] == ["7", "1,200"]
    assert [p.id for p in problems] == ["0", "1"]
    assert problems[0].benchmark == "gsm8k" and problems[0].question.startswith("Tom has")


def test_math_json_list_uses_last_boxed_when_answer_missing(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(MATH, indent=2))
    problems = load_problems(path, benchmark="math500")
    assert [p.gold for p in problems] == ["\\frac{1}{2}", "4"]
    assert problems[1].id == "test/a/1" and problems[0].meta["level"] == "Level 3"
    assert {p.benchmark for p in problems} == {"math500"}


def test_olympiad_parquet_list_answers(tmp_path):
    path = tmp_path / "olympiad.parquet"
    pq.write_table(pa.Table.from_pylist(OLYMPIAD), path)
    (problem,) = load_problems(path)
    assert problem.gold == "-1, 1" and problem.id == "17"


def test_field_overrides_and_limit(tmp_path):
    records = [{"q": f"What is {i}?", "a": i, "answer": "wrong"} for i in range(5)]
    problems = load_problems(write_jsonl(tmp_path / "x.jsonl", records), question_field="q", answer_field="a", limit=3)
    assert [p.gold for p in problems] == ["0", "1", "2"]


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(ProblemFileError, match=r"broken\.jsonl:3: not valid JSON"):
        load_problems(path)


def test_missing_field_names_file_line_and_option(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [GSM8K[0], {"question": "no answer here"}])
    with pytest.raises(ProblemFileError, match=r"missing\.jsonl:2: no answer field .*--answer-field"):
        load_problems(path)
    with pytest.raises(ProblemFileError, match=r"missing\.jsonl:1: no field 'body'"):
        load_problems(path, question_field="body")


def test_json_list_error_reports_element_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"question": "a?", "answer": "1"},\n  {"question": "b?"}\n]\n')
    with pytest.raises(ProblemFileError, match=r"list\.json:3: no answer field"):
        load_problems(path)
    path.write_text('[\n  {"question": "a?", "answer": "1"},\n  {"question": "b?",\n')
    with pytest.raises(ProblemFileError, match=r"list\.json:\d+: "):
        load_problems(path)


def test_solution_without_box_and_duplicate_ids_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ProblemFileError, match=r"m\.jsonl:1: no usable gold answer"):
        load_problems(path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "question": "a", "answer": 1}] * 2)
    with pytest.raises(ProblemFileError, match=r"d\.jsonl:2: duplicate id '1' \(first at .*d\.jsonl:1\)"):
        load_problems(path)


def test_unreadable_sources(tmp_path):
    with pytest.raises(ProblemFileError, match="no such file"):
        load_problems(tmp_path / "absent.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ProblemFileError, match="not a readable parquet file"):
        load_problems(tmp_path / "bad.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProblemFileError, match="no problems found"):
        load_problems(tmp_path / "empty.jsonl")
    (tmp_path / "scalars.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ProblemFileError, match=r"scalars\.jsonl:1: expected a JSON object"):
        load_problems(tmp_path / "scalars.jsonl")


def test_unknown_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ProblemFileError, match="no-such-org/no-such-dataset: not a file"):
        load_problems("no-such-org/no-such-dataset")


@pytest.mark.parametrize(("value", "field", "gold"), [
    ("steps\n#### 42", "answer", "42"), (3.0, "answer", "3"), (2.5, "answer", "2.5"), (7, "answer", "7"),
    ("see \\boxed{x^{2}} and \\boxed{\\{1,2\\}}", "solution", "\\{1,2\\}"), ("\\frac12", "answer", "\\frac12"),
    ([], "answer", None), (None, "answer", None), (True, "answer", None),
])
def test_normalize_gold(value, field, gold):
    assert normalize_gold(value, field) == gold
