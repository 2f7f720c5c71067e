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

import hashlib
import random
import re
from dataclasses import dataclass, field

from topd_megatron.tasks import Problem

OPS = ("add", "subtract", "multiply")
SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}
CONNECTORS = ("then", "next", "so", ";")


@dataclass(frozen=True, slots=True)
class Style:
    """Probabilities of each free surface choice (the reasoning itself is always the same)."""

    swap_commutative: float
    """P(operand order 'k op a' instead of 'a op k') for + and *."""
    relation_gives: float
    """P('gives' instead of '=')."""
    connector: tuple[float, float, float, float]
    """P of each of CONNECTORS between steps."""
    closing_result: float
    """P('result : N .' instead of 'the answer is N .')."""
    slip: float = 0.0
    """P(a step's result is off by one), after which the chain continues from the wrong value: a real fork."""


STYLES = {
    "teacher": Style(swap_commutative=0.1, relation_gives=0.1, connector=(0.7, 0.1, 0.1, 0.1), closing_result=0.1),
    "student": Style(
        swap_commutative=0.7, relation_gives=0.7, connector=(0.1, 0.7, 0.1, 0.1), closing_result=0.8, slip=0.2
    ),
    "uniform": Style(swap_commutative=0.5, relation_gives=0.5, connector=(0.25, 0.25, 0.25, 0.25), closing_result=0.5),
}


@dataclass(kw_only=True, slots=True)
class SyntheticTask:
    """Arithmetic chains; `steps` and `max_operand` are the difficulty knob."""

    steps: int = 3
    """Operations per problem."""
    max_operand: int = 9
    """Operands of add/subtract are 1..max_operand; multipliers are 2..min(5, max_operand)."""
    eval_fraction: int = 10
    """One problem in `eval_fraction` (by a hash of its text) is held out for evaluation, never trained on."""
    name: str = field(default="synthetic")

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 8:
            raise ValueError(f"synthetic task: steps must be in 1..8, got {self.steps}")
        if not 2 <= self.max_operand <= 20:
            raise ValueError(f"synthetic task: max_operand must be in 2..20, got {self.max_operand}")

    # --- problems ------------------------------------------------------------------------------------------------

    def _random_problem(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
        value = start = rng.randint(2, 9)
        ops: list[tuple[str, int]] = []
        while len(ops) < self.steps:
            op = rng.choice(OPS)
            k = rng.randint(2, min(5, self.max_operand)) if op == "multiply" else rng.randint(1, self.max_operand)
            new = apply_op(value, op, k)
            if 0 <= new <= 99:
                ops.append((op, k))
                value = new
        return start, ops

    def _problems(self, n: int, seed: int, held_out: bool) -> list[Problem]:
        rng = random.Random(f"{self.name}-{seed}-{held_out}")
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ValueError(f"synthetic task: cannot draw {n} distinct problems at this difficulty")
            start, ops = self._random_problem(rng)
            prompt = render_prompt(start, ops)
            if prompt in seen or self._is_held_out(prompt) != held_out:
                continue
            seen.add(prompt)
            answer = start
            for op, k in ops:
                answer = apply_op(answer, op, k)
            pid = hashlib.sha256(prompt.encode()).hexdigest()[:12]
            out.append(Problem(id=f"{self.name}-{pid}", prompt=prompt, answer=str(answer)))
        return out

    def _is_held_out(self, prompt: str) -> bool:
        return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % self.eval_fraction == 0

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(n, seed, held_out=False)

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(n, seed, held_out=True)

    # --- checking and traces -------------------------------------------------------------------------------------

    def is_correct(self, completion: str, problem: Problem) -> bool:
        found = extract_answer(completion)
        return found is not None and found == problem.answer

    def sft_traces(self, problems: list[Problem], style: str, seed: int) -> list[str]:
        if style not in STYLES:
            raise ValueError(f"synthetic task: unknown style {style!r}; known: {sorted(STYLES)}")
        rng = random.Random(f"{self.name}-trace-{style}-{seed}")
        return [render_solution(*parse_prompt(p.prompt), STYLES[style], rng) for p in problems]

    def tokenizer_corpus(self) -> list[str]:
        words = [str(i) for i in range(100)]
        words += ["start", "with", "add", "subtract", "multiply", "by", "what", "is", "the", "result", "answer"]
        words += ["+", "-", "*", "=", "gives", ",", ".", "?", ":", *CONNECTORS]
        return [" ".join(words)]


def apply_op(value: int, op: str, k: int) -> int:
    if op == "add":
        return value + k
    if op == "subtract":
        return value - k
    return value * k


def render_prompt(start: int, ops: list[tuple[str, int]]) -> str:
    words = {"add": "add {k}", "subtract": "subtract {k}", "multiply": "multiply by {k}"}
    steps = " , ".join(words[op].format(k=k) for op, k in ops)
    return f"start with {start} , {steps} . what is the result ?"


_STEP = re.compile(r"(add|subtract|multiply by) (\d+)")


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_prompt."""
    m = re.match(r"start with (\d+) ,", prompt)
    if not m:
        raise ValueError(f"not a synthetic prompt: {prompt!r}")
    ops = [("multiply" if w == "multiply by" else w, int(k)) for w, k in _STEP.findall(prompt)]
    return int(m.group(1)), ops


def render_solution(start: int, ops: list[tuple[str, int]], style: Style, rng: random.Random) -> str:
    """A worked solution whose surface choices (and slips, if the style has any) are drawn from `style`."""
    parts = []
    value = start
    for i, (op, k) in enumerate(ops):
        new = apply_op(value, op, k)
        if style.slip and rng.random() < style.slip:
            new = new + 1 if new == 0 or rng.random() < 0.5 else new - 1  # an arithmetic slip, carried forward
            new = min(new, 99)
        a, b = value, k
        if op in ("add", "multiply") and rng.random() < style.swap_commutative:
            a, b = b, a
        relation = "gives" if rng.random() < style.relation_gives else "="
        if i > 0:
            parts.append(rng.choices(CONNECTORS, weights=style.connector)[0])
        parts.append(f"{a} {SYMBOL[op]} {b} {relation} {new}")
        value = new
    closing = f"result : {value} ." if rng.random() < style.closing_result else f"the answer is {value} ."
    return " ".join(parts) + " . " + closing


_ANSWER = re.compile(r"(?:the answer is|result :)\s+(-?\d+)")


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the number after the last 'the answer is' / 'result :'."""
    found = _ANSWER.findall(completion)
    return found[-1] if found else None


def default() -> SyntheticTask:
    """The task the tiny main job uses (3 steps, operands up to 9)."""
    return SyntheticTask()
