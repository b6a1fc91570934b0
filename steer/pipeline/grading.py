"""Answers out: extract the final answer from a completion and check it against the gold answer.

[`extract_answer`] takes the last `\\boxed{}` (or `\\fbox{}`), else GSM8K's `#### N`, else "the answer is ...", else
the last number. [`answers_match`] decides equivalence: plain numbers (with thousands separators, units, currency,
fractions) are compared exactly here; anything else goes to `math-verify` (LaTeX, fractions, radicals, intervals),
which runs in a separate worker process with a time limit, so a hostile expression cannot hang a run and grading
is safe from any thread.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

VERIFY_TIMEOUT = 5.0
_START_ALLOWANCE = 10.0  # seconds for the worker to import math-verify and sympy on first use

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)(?:\.\s|\.?\s*\n|\.?\s*$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_TEXT_MACRO = re.compile(r"\\(?:text|mbox|mathrm|textbf)\s*\{([^{}]*)\}")
_PLAIN_NUMBER = re.compile(r"(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)(?:\s*/\s*(\d+))?")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces kept), or of `\\boxed 5`; else `None`.

    Example:
    >>> last_boxed("so \\\\boxed{1} or rather \\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    for match in reversed(list(_BOX.finditer(text))):
        start = match.end()
        if text.startswith("{", start):
            content = _braced(text, start)
            if content is not None:
                return content.strip()
        elif start < len(text) and match.group().endswith((" ", "\t")):
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                return token.group()
    return None


def _braced(text: str, start: int) -> str | None:
    depth = 0
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start + 1:position]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a completion gives, or `None` when it gives none.

    Tried in order: the last `\\boxed{}`; the text after the last `####`; the last "the answer is X"; the last number.

    Example:
    >>> extract_answer("3 + 4 = 7, so the answer is $7$.")
    '7'
    >>> extract_answer("She pays $1,250 in total.")
    '1250'
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return _tidy(tail[0])
    stated = list(_ANSWER_IS.finditer(text))
    if stated:
        return _tidy(stated[-1].group(1))
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _tidy(answer: str) -> str:
    return answer.strip().strip("$").strip().rstrip(".").strip()


def as_number(answer: str) -> Fraction | None:
    """`answer` as an exact number when it is a plain one (`1,250`, `$18`, `-0.5`, `3/4`, `12 cm`,
    `\\text{12 apples}`, `x = 4`); else `None`."""
    text = _TEXT_MACRO.sub(r" \1 ", answer).replace("\\$", "").replace("$", "").replace("\\!", "")
    text = re.sub(r"^\s*[a-zA-Z]\s*=", "", text).strip().rstrip(".").strip()
    match = _PLAIN_NUMBER.match(text)
    if match is None or not re.fullmatch(r"\s*(%|\\%|[a-zA-Z]{2}[a-zA-Z ]*)?\s*", text[match.end():]):
        return None
    value = Fraction(match.group(1).replace(",", ""))
    return value / int(match.group(2)) if match.group(2) and int(match.group(2)) else value


def answers_match(predicted: str, gold: str, timeout: float = VERIFY_TIMEOUT) -> bool:
    """Whether `predicted` and `gold` are the same answer.

    Args:
        predicted (`str`): an extracted answer (see [`extract_answer`]).
        gold (`str`): the normalised gold answer.
        timeout (`float`, defaults to 5.0): seconds `math-verify` may take before the answer counts as wrong.

    Example:
    >>> answers_match("1,000", "1000"), answers_match("0.5", "1/2"), answers_match("7", "8")
    (True, True, False)
    """
    if _squash(predicted) == _squash(gold):
        return True
    number, gold_number = as_number(predicted), as_number(gold)
    if number is not None and gold_number is not None:
        return number == gold_number
    return _VERIFIER.verify(predicted, gold, timeout)


def _squash(answer: str) -> str:
    return re.sub(r"\s+", "", _tidy(answer)).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def grade(completion: str, gold: str, timeout: float = VERIFY_TIMEOUT) -> bool:
    """Whether the answer `completion` gives equals `gold` (see [`extract_answer`] and [`answers_match`]).

    Example:
    >>> grade("2 + 2 = 4, so \\\\boxed{4}.", "4")
    True
    """
    predicted = extract_answer(completion)
    return predicted is not None and answers_match(predicted, gold, timeout)


class _Verifier:
    """A `math-verify` worker process, started on first use and replaced when a comparison overruns its time.

    A plain subprocess speaking JSON lines (not `multiprocessing`), so it works from scripts without a main guard.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def verify(self, predicted: str, gold: str, timeout: float) -> bool:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", "from steer.pipeline.grading import serve; serve()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            request = json.dumps({"predicted": predicted, "gold": gold, "seconds": max(1, int(timeout))})
            try:
                self._process.stdin.write(request + "\n")
                self._process.stdin.flush()
            except BrokenPipeError:
                self._stop()
                return False
            ready, _, _ = select.select([self._process.stdout], [], [], timeout + _START_ALLOWANCE)
            reply = self._process.stdout.readline() if ready else ""
            if not reply:
                self._stop()
                return False
            return json.loads(reply)

    def _stop(self) -> None:
        self._process.kill()
        self._process.wait()
        self._process = None


def serve() -> None:
    """The worker's loop: one JSON request per line on stdin, `true`/`false` per line on stdout."""
    from math_verify import parse, verify

    for line in sys.stdin:
        request = json.loads(line)
        seconds = request["seconds"]
        try:
            gold = parse(f"${request['gold']}$", parsing_timeout=seconds)
            predicted = parse(f"${request['predicted']}$", parsing_timeout=seconds)
            result = bool(gold and predicted and verify(gold, predicted, timeout_seconds=seconds))
        except Exception:  # math-verify raises on unparsable or timed-out input: not a match
            result = False
        print(json.dumps(result), flush=True)


_VERIFIER = _Verifier()
