"""Grading: is a completion's final answer mathematically equal to the reference?

    grade(completion, reference)                 -> bool
    grade_detailed(completion, reference, ...)   -> Grade(correct, status, extracted)
    grade_answer(answer, reference, ...)         -> Grade   (an already-extracted answer)

The answer text is found by `extract.extract_answer` (the benchmark's rule), lightly normalised (math delimiters,
Unicode minus, thousands separators such as `1{,}000` or `1\\,000`, a trailing period), then both sides are parsed
as LaTeX by math-verify and compared with `math_verify.verify`: fractions and decimals, `\\dfrac`, percentages,
degrees, `\\text{}` wrappers and units, tuples, intervals, sets, matrices, equations (`x=5` against `5`) and
leading zeros (AIME "025") all compare by value.

Status of a Grade:
    correct     equal to the reference
    incorrect   parsed, and not equal
    no_answer   the completion states no final answer under the rule
    unparsable  an answer was found but math-verify cannot read it as mathematics (and it is not the same string)
    timeout     parsing or comparing took longer than `timeout_s` (pathological expressions such as 9^{9^{9^9}})

Timeouts are math-verify's own (SIGALRM, whole seconds): parsing the answer and comparing it are each bounded by
`timeout_s`, and the parsed reference is cached. SIGALRM works only in the main thread, so grading with a timeout
off the main thread raises; pass `timeout_s=None` there and bound the work yourself (e.g. a process pool).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, MatrixBase

from topd_megatron.evaluation.extract import AnswerRule, extract_answer

GradeStatus = Literal["correct", "incorrect", "no_answer", "unparsable", "timeout"]

_DELIMITERS = re.compile(r"^(?:\\\(|\\\[)|(?:\\\)|\\\])$")
_DOLLAR = re.compile(r"(?<!\\)\$")
# Between digit groups: {,}  ,\!  \,  \!  "\ "  and the Unicode thin/narrow spaces, when exactly 3 digits follow.
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,\\!\s*|\\,|\\!|\\ |\u2009|\u202f)(?=\d{3}(?!\d))")


@dataclass(frozen=True, slots=True)
class Grade:
    """One graded completion."""

    correct: bool
    status: GradeStatus
    extracted: str | None
    """The final-answer text found in the completion (before normalisation); None when there is none."""


def normalise_answer(answer: str) -> str:
    """Formatting-only clean-up before math-verify parses an answer (the reference gets the same treatment)."""
    text = " ".join(answer.split()).replace("\u2212", "-")
    text = _DELIMITERS.sub("", text.strip())
    text = _DOLLAR.sub("", text)
    text = _THOUSANDS.sub("", text)
    return text.strip().rstrip(".").strip()


def _check_timeout(timeout_s: int | None) -> None:
    if timeout_s is None:
        return
    if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s < 1:
        raise ValueError(f"timeout_s must be a whole number of seconds >= 1 or None, got {timeout_s!r}")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "grading with a timeout uses SIGALRM (math-verify), which works only in the main thread; pass"
            " timeout_s=None to grade in other threads and bound the time yourself"
        )


def _parse(text: str, timeout_s: int | None) -> list[Any]:
    """math-verify's parse of one answer as inline LaTeX: [sympy object, its string] or [string] or []."""
    try:
        return list(parse(f"${normalise_answer(text)}$", parsing_timeout=timeout_s, raise_on_error=True))
    except Exception:  # malformed input (TimeoutException is a BaseException: it propagates)
        return []


@lru_cache(maxsize=8192)
def _parse_reference(reference: str, timeout_s: int | None) -> tuple[Any, ...]:
    return tuple(_parse(reference, timeout_s))


def _is_math(parsed: list[Any] | tuple[Any, ...]) -> bool:
    return any(isinstance(p, (Basic, MatrixBase)) for p in parsed)


def _equal(gold: tuple[Any, ...], answer: list[Any], timeout_s: int | None) -> bool | None:
    """Whether any parsed form of the answer equals any of the reference's; None when a comparison timed out and
    none succeeded."""
    timed_out = False
    for g in gold:
        for a in answer:
            try:
                if verify(g, a, timeout_seconds=timeout_s, raise_on_error=True):
                    return True
            except TimeoutException:
                timed_out = True
            except Exception:  # a sympy failure on this pair of forms: not equal, try the others
                continue
    return None if timed_out else False


def grade_answer(answer: str, reference: str, *, timeout_s: int | None = 5) -> Grade:
    """Compare an already-extracted final answer with the reference (no extraction step)."""
    _check_timeout(timeout_s)
    if not normalise_answer(reference):
        raise ValueError(f"empty reference answer {reference!r}")
    if not normalise_answer(answer):
        return Grade(correct=False, status="no_answer", extracted=None)
    try:
        gold = _parse_reference(reference, timeout_s)
        parsed = _parse(answer, timeout_s)
        equal = _equal(gold, parsed, timeout_s)
    except TimeoutException:
        return Grade(correct=False, status="timeout", extracted=answer)
    if equal:
        return Grade(correct=True, status="correct", extracted=answer)
    if equal is None:
        return Grade(correct=False, status="timeout", extracted=answer)
    status: GradeStatus = "incorrect" if _is_math(parsed) else "unparsable"
    return Grade(correct=False, status=status, extracted=answer)


def grade_detailed(completion: str, reference: str, *, rule: AnswerRule = "boxed", timeout_s: int | None = 5) -> Grade:
    """Extract the final answer of `completion` under `rule` and compare it with `reference` (module docstring)."""
    _check_timeout(timeout_s)
    extracted = extract_answer(completion, rule)
    if extracted is None:
        return Grade(correct=False, status="no_answer", extracted=None)
    return grade_answer(extracted, reference, timeout_s=timeout_s)


def grade(completion: str, reference: str, *, rule: AnswerRule = "boxed", timeout_s: int | None = 5) -> bool:
    """Whether the final answer of `completion` (last `\\boxed{}`, or the rule's fallback) equals `reference`."""
    return grade_detailed(completion, reference, rule=rule, timeout_s=timeout_s).correct
