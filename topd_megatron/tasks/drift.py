"""Arithmetic chains built to contain the mechanisms TOPD is about (docs/tiny.md, "The task").

    user:      start with 7 , add 5 , multiply by 3 , subtract 4 . what is the result ?
    teacher:   7 + 5 = 1 2 then 1 2 * 3 = 3 6 then 3 6 - 4 = 3 2 . the answer is 3 2 .
    student:   5 + 7 gives 1 2 next 3 * 1 2 gives 3 6 next 3 6 - 4 gives 3 2 . result : 3 2 .

Numbers are written digit by digit, one token per digit. Every trace mixes real reasoning choices (the digits of each
intermediate result) with free surface choices (operand order of + and *, "=" or "gives", the connector, the closing
phrase), and the two styles are built so that:

1. **Imitating the teacher's surface forms costs the student something real.** The student is trained on its own
   phrasing only (every surface choice deterministic), so its arithmetic is learnt in contexts of its own phrasing;
   the teacher's phrasing ("=", "then", natural operand order) puts it in states it never saw. The teacher saw both
   phrasings (15% of its traces use the student's), so it scores the student's phrasing competently.
2. **Real forks unfold as short-horizon drift.** A slip changes a result by 10 or by 1: the tens or the units digit
   goes wrong, the digit after a wrong tens digit is conditioned on it, and the chain carries the wrong value to the
   end. On two-digit multiplications the student's slip is a misconception (its tens digit one too high in 60% of
   its traces), so even its greedy decoding takes the fork. After the first wrong digit the teacher, scoring the
   student's own prefix, continues the wrong value consistently: token-level repair has one position to act on, the
   near-future window has several.
3. **Near-future teacher windows reach states the student's rollouts rarely visit.** The student slips on 60% of its
   multiplications and on 5% of other steps, so a correct value after a multiplication is a state its rollouts rarely
   reach; the teacher's window from the fork continues from exactly that state.

`choice_kind` labels the next token of any response prefix as a reasoning or a surface choice (the oracle-detector
arm and the oracle's position classes use it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from topd_megatron.tasks import ChoiceKind
from topd_megatron.tasks.chains import (
    CONNECTORS,
    SYMBOL,
    ChainTask,
    SurfaceStyle,
    apply_op,
    parse_chain_prompt,
    render_chain_prompt,
    render_chain_solution,
)


@dataclass(frozen=True, slots=True)
class DriftStyle(SurfaceStyle):
    """How one model writes: the probability of each surface choice, and its arithmetic slips."""

    slip: float = 0.0
    """P(a non-multiplication step's result is off by 1 or by 10), carried forward: a real fork."""
    slip_multiply: float = 0.0
    """P(a multiplication slips): a two-digit result gets its tens digit wrong (systematically one too high where the
    chain allows it), a one-digit result is off by 1."""


DRIFT_STYLES = {
    "teacher": DriftStyle(
        swap_commutative=0.15, relation_gives=0.15, connector=(0.85, 0.15, 0.0, 0.0), closing_result=0.15
    ),
    "student": DriftStyle(
        swap_commutative=1.0,
        relation_gives=1.0,
        connector=(0.0, 1.0, 0.0, 0.0),
        closing_result=1.0,
        slip=0.05,
        slip_multiply=0.6,
    ),
}


def number(n: int) -> str:
    """A number digit by digit: 36 -> '3 6'."""
    return " ".join(str(n))


def render_prompt(start: int, ops: list[tuple[str, int]]) -> str:
    return render_chain_prompt(start, ops, number)


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_prompt."""
    return parse_chain_prompt(prompt, r"(?:\d )*\d", "drift")


def _slipped(new: int, rest: list[tuple[str, int]], deltas: list[int]) -> int:
    """The first of `deltas` that keeps the chain carried on from the wrong value within 0..99 (no slip if none)."""
    for d in deltas:
        value = new + d
        ok = 0 <= value <= 99
        for op, k in rest:
            value = apply_op(value, op, k)
            ok = ok and 0 <= value <= 99
        if ok:
            return new + d
    return new


def _slip_deltas(op: str, new: int, rng: random.Random) -> list[int]:
    """A multiplication with a two-digit result slips systematically (its tens digit one too high, else one too
    low): a misconception, the student's most likely token there is wrong. Other slips are random: off by 1 or 10."""
    if op == "multiply" and new >= 10:
        return [10, -10]
    deltas = [d * sign for d in (1, 10) for sign in (-1, 1)]
    rng.shuffle(deltas)
    return deltas


def render_solution(start: int, ops: list[tuple[str, int]], style: DriftStyle, rng: random.Random) -> str:
    """A worked solution whose surface choices (and slips, if the style has any) are drawn from `style`."""

    def slip(i: int, new: int) -> int:
        op = ops[i][0]
        p = style.slip_multiply if op == "multiply" else style.slip
        if p and rng.random() < p:
            return _slipped(new, ops[i + 1 :], _slip_deltas(op, new, rng))
        return new

    return render_chain_solution(start, ops, style, rng, slip=slip, number=number)


_ANSWER = re.compile(r"(?:the answer is|result :)((?: \d)+)(?= \.|$)")


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the digits after the last 'the answer is' / 'result :', joined."""
    found = _ANSWER.findall(completion)
    return found[-1].replace(" ", "") if found else None


def _digits_kind(written: list[str], correct: int) -> ChoiceKind:
    """Inside a number that should equal `correct`: more digits of it are reasoning; once it is complete, the token
    after it (a relation, a connector, '.') is surface."""
    if written == list(str(correct)):
        return "surface"
    return "reasoning"


def _read_number(words: list[str], at: int) -> tuple[list[str], int]:
    """The digit words starting at `at` and the index after them."""
    end = at
    while end < len(words) and words[end].isdigit() and len(words[end]) == 1:
        end += 1
    return words[at:end], end


def choice_kind(prompt: str, response_prefix: str) -> ChoiceKind | None:
    """The kind of the next token after `response_prefix` (see DriftTask.choice_kind), found by walking the trace
    grammar: per step OPERAND SYMBOL OPERAND RELATION RESULT, steps joined by a connector, then
    '. the answer is N .' or '. result : N .'. A result is judged against the value the prefix itself carries (after
    a wrong result the chain continues from it), so only the digits of a result and the forced tokens are reasoning."""
    start, ops = parse_prompt(prompt)
    words, at, value = response_prefix.split(), 0, start
    for i, (op, k) in enumerate(ops):
        first, at = _read_number(words, at)
        if at == len(words):  # the first operand: free order for + and *
            if not first:
                return "surface" if op in ("add", "multiply") else "reasoning"
            return "reasoning"
        if words[at] != SYMBOL[op]:
            return None
        second, at = _read_number(words, at + 1)
        if at == len(words):
            return "reasoning" if not second or int("".join(second)) not in (value, k) else "surface"
        if words[at] not in ("=", "gives"):
            return None
        result, at = _read_number(words, at + 1)
        if at == len(words):
            return _digits_kind(result, apply_op(value, op, k)) if result else "reasoning"
        if not result:
            return None
        value = int("".join(result))
        expected = CONNECTORS if i + 1 < len(ops) else (".",)
        if words[at] not in expected:
            return None
        at += 1
    closing = words[at:]
    for phrase in (["the", "answer", "is"], ["result", ":"]):
        if closing[: len(phrase)] == phrase[: len(closing)] and len(closing) < len(phrase):
            return "surface"  # inside the closing phrase (its choice was made at its first word)
        if closing[: len(phrase)] == phrase:
            digits, end = _read_number(closing, len(phrase))
            if end == len(closing):
                return _digits_kind(digits, value) if digits else "reasoning"
            return None
    return "surface" if not closing else None


@dataclass(kw_only=True, slots=True)
class DriftTask(ChainTask[DriftStyle]):
    """Digit-level arithmetic chains with phrasing-bound student competence (module docstring)."""

    name: str = field(default="drift")

    render_prompt = staticmethod(render_prompt)

    def max_multiplier(self) -> int:
        return 5

    # --- checking, traces, choice labels -------------------------------------------------------------------------

    render_solution = staticmethod(render_solution)
    parse_prompt = staticmethod(parse_prompt)
    extract_answer = staticmethod(extract_answer)

    def styles(self) -> Mapping[str, DriftStyle]:
        return DRIFT_STYLES

    def number_words(self) -> list[str]:
        return [str(i) for i in range(10)]

    def choice_kind(self, prompt: str, response_prefix: str) -> ChoiceKind | None:
        """Whether the next token after `response_prefix` is a reasoning choice (a digit of a result: a wrong one is
        a fork) or a surface choice (an operand order, relation, connector or closing phrase: every option is
        correct); None where the prefix does not follow the trace grammar (e.g. after a malformed step)."""
        return choice_kind(prompt, response_prefix)


def default() -> DriftTask:
    """The task the tiny main job uses (3 steps, operands up to 9)."""
    return DriftTask()
