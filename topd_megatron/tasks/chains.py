"""What the arithmetic-chain tasks share: the operations, the drawing of train / held-out problems, the checking.

A problem is a start value (2..9) and `steps` operations on a running value that stays in 0..99; one problem in
`eval_fraction` (by a hash of its text) is held out for evaluation and never trained on. The tasks differ in how they
write numbers and solutions (`tasks.synthetic`: whole numbers, `tasks.drift`: digit by digit).
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from topd_megatron.tasks import Problem

OPS = ("add", "subtract", "multiply")
SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}
CONNECTORS = ("then", "next", "so", ";")


@dataclass(frozen=True, slots=True)
class SurfaceStyle:
    """The probability of each free surface choice of a solution (a task's style adds its slips)."""

    swap_commutative: float
    """P(operand order 'k op a' instead of 'a op k') for + and *."""
    relation_gives: float
    """P('gives' instead of '=')."""
    connector: tuple[float, float, float, float]
    """P of each of CONNECTORS between steps."""
    closing_result: float
    """P('result : N .' instead of 'the answer is N .')."""


def apply_op(value: int, op: str, k: int) -> int:
    if op == "add":
        return value + k
    if op == "subtract":
        return value - k
    return value * k


_WORDS = {"add": "add {k}", "subtract": "subtract {k}", "multiply": "multiply by {k}"}


def render_chain_prompt(start: int, ops: list[tuple[str, int]], number: Callable[[int], str] = str) -> str:
    """'start with 7 , add 5 , multiply by 3 . what is the result ?', each number written by `number`."""
    steps = " , ".join(_WORDS[op].format(k=number(k)) for op, k in ops)
    return f"start with {number(start)} , {steps} . what is the result ?"


def render_chain_solution(
    start: int,
    ops: list[tuple[str, int]],
    style: SurfaceStyle,
    rng: random.Random,
    *,
    slip: Callable[[int, int], int],
    number: Callable[[int], str] = str,
) -> str:
    """A worked solution: each step 'a op b = r' (surface choices drawn from `style` in a fixed order), joined by
    connectors, then the closing phrase. `slip(i, r)` gives step i's written result from its true one `r` (a task's
    slips, drawn from the same `rng`); a slipped result is carried forward."""
    parts = []
    value = start
    for i, (op, k) in enumerate(ops):
        new = slip(i, apply_op(value, op, k))
        a, b = value, k
        if op in ("add", "multiply") and rng.random() < style.swap_commutative:
            a, b = b, a
        relation = "gives" if rng.random() < style.relation_gives else "="
        if i > 0:
            parts.append(rng.choices(CONNECTORS, weights=style.connector)[0])
        parts.append(f"{number(a)} {SYMBOL[op]} {number(b)} {relation} {number(new)}")
        value = new
    closing = "result :" if rng.random() < style.closing_result else "the answer is"
    return " ".join(parts) + f" . {closing} {number(value)} ."


def parse_chain_prompt(prompt: str, number_pattern: str, task: str) -> tuple[int, list[tuple[str, int]]]:
    """Inverse of render_chain_prompt, for numbers matching `number_pattern` (spaces inside a number are ignored);
    the prompt may sit inside other text (a chat template)."""
    m = re.search(rf"start with ({number_pattern}) ,", prompt)
    if not m:
        raise ValueError(f"not a {task} prompt: {prompt!r}")
    steps = re.findall(rf"(add|subtract|multiply by) ({number_pattern})(?= [,.])", prompt)
    ops = [("multiply" if w == "multiply by" else w, int(k.replace(" ", ""))) for w, k in steps]
    return int(m.group(1).replace(" ", "")), ops


@dataclass(kw_only=True, slots=True)
class ChainTask[StyleT](ABC):
    """The difficulty fields, the problem drawing, the checking and the traces of an arithmetic-chain task. The task
    sets its `name` and says how it writes prompts, solutions, answers and numbers (`render_prompt`,
    `render_solution`, `parse_prompt`, `extract_answer`, `number_words`), its trace styles (`styles`; StyleT
    describes how one model writes) and its largest multiplier (`max_multiplier`)."""

    steps: int = 3
    """Operations per problem."""
    max_operand: int = 9
    """Operands of add/subtract are 1..max_operand; multipliers are 2..max_multiplier()."""
    eval_fraction: int = 10
    """One problem in `eval_fraction` (by a hash of its text) is held out for evaluation, never trained on."""
    name: str = "chains"
    """Names the task's problems and seeds their draw (each task sets its own)."""

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 8:
            raise ValueError(f"{self.name} task: steps must be in 1..8, got {self.steps}")
        if not 2 <= self.max_operand <= 20:
            raise ValueError(f"{self.name} task: max_operand must be in 2..20, got {self.max_operand}")

    @abstractmethod
    def render_prompt(self, start: int, ops: list[tuple[str, int]]) -> str:
        """The problem's prompt text."""

    @abstractmethod
    def render_solution(self, start: int, ops: list[tuple[str, int]], style: StyleT, rng: random.Random) -> str:
        """A worked solution written in `style`, its choices drawn from `rng`."""

    @abstractmethod
    def parse_prompt(self, prompt: str) -> tuple[int, list[tuple[str, int]]]:
        """Inverse of render_prompt: (start, [(op, k), ...])."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The final answer a completion states, normalised like `Problem.answer`; None if it states none."""

    @abstractmethod
    def styles(self) -> Mapping[str, StyleT]:
        """The trace styles `sft_traces` accepts, by name."""

    @abstractmethod
    def number_words(self) -> list[str]:
        """The tokens numbers are written with."""

    def max_multiplier(self) -> int:
        return min(5, self.max_operand)

    def _random_problem(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
        value = start = rng.randint(2, 9)
        ops: list[tuple[str, int]] = []
        while len(ops) < self.steps:
            op = rng.choice(OPS)
            k = rng.randint(2, self.max_multiplier()) if op == "multiply" else rng.randint(1, self.max_operand)
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
                raise ValueError(f"{self.name} task: cannot draw {n} distinct problems at this difficulty")
            start, ops = self._random_problem(rng)
            prompt = self.render_prompt(start, ops)
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

    def is_correct(self, completion: str, problem: Problem) -> bool:
        found = self.extract_answer(completion)
        return found is not None and found == problem.answer

    def sft_traces(self, problems: list[Problem], style: str, seed: int) -> list[str]:
        styles = self.styles()
        if style not in styles:
            raise ValueError(f"{self.name} task: unknown style {style!r}; known: {sorted(styles)}")
        rng = random.Random(f"{self.name}-trace-{style}-{seed}")
        return [self.render_solution(*self.parse_prompt(p.prompt), styles[style], rng) for p in problems]

    def tokenizer_corpus(self) -> list[str]:
        words = self.number_words()
        words += ["start", "with", "add", "subtract", "multiply", "by", "what", "is", "the", "result", "answer"]
        words += ["+", "-", "*", "=", "gives", ",", ".", "?", ":", *CONNECTORS]
        return [" ".join(words)]
