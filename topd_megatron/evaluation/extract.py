"""Final-answer extraction: the text of a completion's final answer, under a benchmark's answer rule.

    rule "boxed"   the last \\boxed{...} or \\fbox{...} (balanced braces); else the last "the (final) answer is X"
                   or "answer: X" phrase (rest of its sentence)
    rule "gsm8k"   the last \\boxed{...}; else the number after the last "#### "; else the first number of the last
                   "the answer is ..." phrase; else the last number in the completion

Only the *text* is extracted here; whether it is right is decided by `grading` (math-verify). An unclosed last box
(a completion cut off inside `\\boxed{`) or an empty one is not an answer, under either rule: neither an earlier box
(usually an intermediate result) nor another rule's phrase is used in its place.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

AnswerRule = Literal["boxed", "gsm8k"]
"""How a benchmark's completions state their final answer (see the module docstring)."""
ANSWER_RULES: tuple[str, ...] = get_args(AnswerRule)

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_PHRASE = re.compile(r"(?i)\banswer\b(?:\s+is\b\s*:?|\s*:)[ \t]*")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
# 1,234,567.89 | 1234.5 | .5, with an optional minus (ASCII or U+2212) that is not a subtraction ("5-3").
_NUMBER = re.compile(r"(?:(?<![\w)])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_GSM8K_MARK = re.compile(r"####[ \t]*(?P<rest>[^\n]*)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), or None if there is none, it is
    unclosed, or it is empty. Braces are matched with LaTeX escapes (`\\{`, `\\}`) skipped."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] != "{":  # `\boxed 5`: one TeX token, up to whitespace or math delimiter
        content = re.match(r"[^\s$]*", text[i:])
        return (content.group(0) if content else "") or None
    depth, start = 0, i + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip() or None
        i += 1
    return None


def answer_phrase(text: str) -> str | None:
    """The rest of the sentence after the last "answer is" / "answer:" (Markdown bold and `$` kept), or None."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    rest = (rest[: end.start()] if end else rest).strip().strip("*").strip()
    return rest or None


def numbers(text: str) -> list[str]:
    """The numbers in `text`, in order, with thousands separators removed and a Unicode minus made ASCII."""
    return [m.group(0).replace(",", "").replace("\u2212", "-") for m in _NUMBER.finditer(text)]


def extract_answer(completion: str, rule: AnswerRule = "boxed") -> str | None:
    """The final-answer text of `completion` under `rule`, or None when it states none."""
    if rule not in ANSWER_RULES:
        raise ValueError(f"unknown answer rule {rule!r}; known: {', '.join(ANSWER_RULES)}")
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if _BOX.search(completion):
        return None  # an unclosed or empty last box: the completion never finished its answer
    if rule == "boxed":
        return answer_phrase(completion)
    marks = list(_GSM8K_MARK.finditer(completion))
    if marks:
        found = numbers(marks[-1].group("rest"))
        return found[0] if found else None
    phrase = answer_phrase(completion)
    if phrase is not None and (found := numbers(phrase)):
        return found[0]
    found = numbers(completion)
    return found[-1] if found else None
