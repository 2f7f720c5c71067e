"""A synthetic multi-step reasoning task with known forks and free surface-form choices.

A problem is a chain of arithmetic steps on a running value (kept within 0..99):

    user:      start with 7 , add 5 , multiply by 3 , subtract 4 . what is the result ?
    assistant: 7 + 5 = 12 then 12 * 3 = 36 then 36 - 4 = 32 . the answer is 32 .

Every solution mixes two kinds of tokens, which is what TOPD's detector must tell apart:
- real reasoning steps: the intermediate results. A wrong result is a *fork*: the chain continues from a wrong value
  and the final answer is wrong.
- free surface-form choices, which never change the answer: operand order of commutative steps ("7 + 5" or
  "5 + 7"), the relation word ("=" or "gives"), the connector between steps ("then", "next", "so", ";") and the
  closing phrase ("the answer is 32 ." or "result : 32 ."). A mismatch there is a *surface mismatch*.

Styles fix the probability of each surface choice and of arithmetic slips (a result off by one, from which the chain
continues: a wrong final answer). The teacher is trained on the "teacher" style (no slips) and the student on the
"student" style (other phrasings, 20% of steps slipped), so the student is weaker and prefers other surface forms:
the pair's high-divergence tokens include both real forks (the student's slips) and surface mismatches (phrasing),
as in the paper.

Difficulty (`steps`, `max_operand`) sets the chain length and the operand range.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from topd_megatron.tasks.chains import (
    ChainTask,
    SurfaceStyle,
    parse_chain_prompt,
    render_chain_prompt,
    render_chain_solution,
)


@dataclass(frozen=True, slots=True)
class Style(SurfaceStyle):
    """Probabilities of each free surface choice (the reasoning itself is always the same)."""

    slip: float = 0.0
    """P(a step's result is off by one), after which the chain continues from the wrong value: a real fork."""


STYLES = {
    "teacher": Style(swap_commutative=0.1, relation_gives=0.1, connector=(0.7, 0.1, 0.1, 0.1), closing_result=0.1),
    "student": Style(
        swap_commutative=0.7, relation_gives=0.7, connector=(0.1, 0.7, 0.1, 0.1), closing_result=0.8, slip=0.2
    ),
    "uniform": Style(swap_commutative=0.5, relation_gives=0.5, connector=(0.25, 0.25, 0.25, 0.25), closing_result=0.5),
}


def render_prompt(start: int, ops: list[tuple[str, int]]) -> str:
    return render_chain_prompt(start, ops)


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_prompt."""
    return parse_chain_prompt(prompt, r"\d+", "synthetic")


def render_solution(start: int, ops: list[tuple[str, int]], style: Style, rng: random.Random) -> str:
    """A worked solution whose surface choices (and slips, if the style has any) are drawn from `style`."""

    def slip(_: int, new: int) -> int:
        if style.slip and rng.random() < style.slip:  # an arithmetic slip by one, carried forward
            return min(new + 1 if new == 0 or rng.random() < 0.5 else new - 1, 99)
        return new

    return render_chain_solution(start, ops, style, rng, slip=slip)


_ANSWER = re.compile(r"(?:the answer is|result :)\s+(-?\d+)")


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the number after the last 'the answer is' / 'result :'."""
    found = _ANSWER.findall(completion)
    return found[-1] if found else None


@dataclass(kw_only=True, slots=True)
class SyntheticTask(ChainTask[Style]):
    """Arithmetic chains; `steps` and `max_operand` are the difficulty knob."""

    name: str = field(default="synthetic")

    render_prompt = staticmethod(render_prompt)

    # --- checking and traces -------------------------------------------------------------------------------------

    render_solution = staticmethod(render_solution)
    parse_prompt = staticmethod(parse_prompt)
    extract_answer = staticmethod(extract_answer)

    def styles(self) -> Mapping[str, Style]:
        return STYLES

    def number_words(self) -> list[str]:
        return [str(i) for i in range(100)]


def default() -> SyntheticTask:
    """The task the tiny main job uses (3 steps, operands up to 9)."""
    return SyntheticTask()
