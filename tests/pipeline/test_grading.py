"""Answer extraction and equivalence."""

import threading
import time

import pytest

from steer.pipeline.grading import answers_match, as_number, extract_answer, grade, last_boxed


@pytest.mark.parametrize(("text", "answer"), [
    ("first \\boxed{3}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
    ("old style \\fbox{12}", "12"),
    ("bare $\\boxed 5$", "5"),
    ("work...\n#### 1,234\n", "1,234"),
    ("So the answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is: 18 dollars.\nThanks", "18 dollars"),
    ("I think 3, no, 1,250 apples", "1250"),
    ("-7 is less than 2.5", "2.5"),
    ("no numbers at all", None),
    ("unclosed \\boxed{12 then 7", "7"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed_none_without_box():
    assert last_boxed("nothing boxed") is None


@pytest.mark.parametrize(("answer", "value"), [
    ("1,250", 1250), ("$18.50", 18.5), ("\\$18.50", 18.5), ("12 cm", 12), ("\\text{12 apples}", 12),
    ("x = 4", 4), ("-0.5", -0.5), ("3/4", 0.75), ("50\\%", 50), ("1,2", None), ("\\frac{1}{2}", None),
    ("2x", None), ("", None),
])
def test_as_number(answer, value):
    number = as_number(answer)
    assert (number is None) if value is None else float(number) == value


@pytest.mark.parametrize(("predicted", "gold", "same"), [
    ("1,000", "1000", True), ("0.5", "1/2", True), ("7", "8", False), ("18 dollars", "18", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.5", True), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("(1, 2]", "(1,2]", True), ("[1, 2]", "(1,2]", False), ("x^2+2x+1", "(x+1)^2", True),
    ("\\frac{1}{3}", "0.5", False),
])
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_grade_uses_extraction():
    assert grade("2 + 2 = 4, so \\boxed{4}.", "4")
    assert not grade("2 + 2 = 5, so \\boxed{5}.", "4")
    assert not grade("I do not know.", "4")


def test_hostile_expression_is_cut_off():
    start = time.monotonic()
    assert not answers_match("9^{9^{9^{9^{9^{9}}}}}", "2", timeout=1)
    assert time.monotonic() - start < 15
    assert answers_match("\\frac{2}{4}", "\\frac{1}{2}")  # the worker is replaced and still answers


def test_grading_from_threads():
    results = [None] * 6
    cases = [("\\frac{1}{2}", "0.5", True), ("\\sqrt{4}", "2", True), ("\\pi", "3", False)] * 2

    def run(i):
        results[i] = answers_match(cases[i][0], cases[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [case[2] for case in cases]
