"""Tasks: where prompts, reference answers, correctness checks and SFT traces come from.

A task is any object with the `Task` protocol's members; pick one with `--task module:attr` (the attribute is a
Task or a zero-argument callable returning one), e.g. `--task topd_megatron.tasks.synthetic:default` or
`--task my_project.tasks:make_task`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

ChoiceKind = Literal["reasoning", "surface"]
"""What the next token of a response decides: the reasoning (a wrong token is a real fork) or only its surface
form (every option is correct)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: what the user says, and the answer a correct completion must reach."""

    id: str
    prompt: str
    """The user turn (rendered with the model's chat template by the trainer)."""
    answer: str
    """Reference final answer, as the task's `is_correct` compares it."""


@runtime_checkable
class Task(Protocol):
    """What a task gives the trainer. Implementations must be deterministic for a given seed."""

    name: str

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` training problems (prompts for on-policy rollouts)."""
        ...

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` held-out problems, disjoint from every training draw."""
        ...

    def is_correct(self, completion: str, problem: Problem) -> bool:
        """Whether the assistant completion reaches the problem's answer."""
        ...

    def sft_traces(self, problems: list[Problem], style: str, seed: int) -> list[str]:
        """Worked solutions (assistant text) for `problems`, written in `style` (task-defined; "teacher" and
        "student" must exist), used to prepare the teacher and the student before distillation."""
        ...

    def tokenizer_corpus(self) -> list[str]:
        """Text covering everything the task can produce, to build a tokenizer for tiny models."""
        ...


@runtime_checkable
class LabelsChoices(Protocol):
    """A task that can label its own choices (optional; the oracle-detector arm and the oracle's position classes use
    it). Toy tasks can; real reasoning tasks cannot."""

    def choice_kind(self, prompt: str, response_prefix: str) -> ChoiceKind | None:
        """The kind of choice the next token after `response_prefix` (the response so far, decoded) makes for the
        problem asked in `prompt` (the decoded user turn, possibly wrapped in chat-template words); None: unknown."""
        ...


def load_task(spec: str) -> Task:
    """Resolve 'module:attr' to a Task (calling `attr` if it is a factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--task must look like 'package.module:attr', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--task {spec!r}: cannot import {module_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise ValueError(f"--task {spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    task = obj
    if callable(obj) and not isinstance(obj, Task):
        try:
            task = obj()
        except TypeError as e:
            raise ValueError(f"--task {spec!r} is neither a Task nor a zero-argument factory of one ({e})") from e
    if not isinstance(task, Task):
        missing = [
            m
            for m in ("name", "train_problems", "eval_problems", "is_correct", "sft_traces", "tokenizer_corpus")
            if not hasattr(task, m)
        ]
        raise ValueError(f"--task {spec!r} is not a Task: missing {missing}")
    return task
