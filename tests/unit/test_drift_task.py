"""The drift task: problems, the two styles' mechanisms (phrasing-bound student, systematic multiplication slips
carried forward), digit-level answers, and the task's own labels of its choices."""

from __future__ import annotations

import random

import pytest

from topd_megatron.tasks import LabelsChoices, Problem, Task, load_task
from topd_megatron.tasks.drift import (
    DRIFT_STYLES,
    DriftTask,
    choice_kind,
    extract_answer,
    parse_prompt,
    render_solution,
)


def test_drift_is_a_task_that_labels_its_choices() -> None:
    task = load_task("topd_megatron.tasks.drift:default")
    assert isinstance(task, Task) and isinstance(task, LabelsChoices)
    train = task.train_problems(2000, seed=0)
    held_out = task.eval_problems(300, seed=0)
    assert len({p.prompt for p in train}) == 2000
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    assert all(parse_prompt(p.prompt)[0] >= 2 for p in held_out)


def test_styles_put_the_mechanisms_in_the_traces() -> None:
    task = DriftTask()
    problems = task.train_problems(2000, seed=0)
    teacher = task.sft_traces(problems, "teacher", seed=0)
    student = task.sft_traces(problems, "student", seed=0)
    assert all(task.is_correct(t, p) for t, p in zip(teacher, problems, strict=True))
    wrong = [not task.is_correct(t, p) for t, p in zip(student, problems, strict=True)]
    assert 0.4 < sum(wrong) / len(wrong) < 0.7
    # the student's phrasing is deterministic: never the teacher's relation, connector or closing
    assert not any(" = " in s or " then " in s or "the answer is" in s for s in student)
    # the teacher mostly writes its own phrasing but has seen the student's (it scores that phrasing competently)
    gives = sum(" gives " in t for t in teacher) / len(teacher)
    assert 0.2 < gives < 0.8
    # a multiplication's slip is systematic: the tens digit one too high where the chain allows it
    rng = random.Random(0)
    hits = 0
    for _ in range(200):
        text = render_solution(7, [("multiply", 5)], DRIFT_STYLES["student"], rng)
        result = extract_answer(text)
        assert result in ("35", "45", "25")
        hits += result == "45"
    assert 90 < hits < 150  # 60% of multiplications slip, upwards


def test_numbers_are_written_digit_by_digit_and_answers_are_read_back() -> None:
    p = Problem(id="x", prompt="start with 3 , multiply by 4 , add 1 2 . what is the result ?", answer="24")
    assert parse_prompt(p.prompt) == (3, [("multiply", 4), ("add", 12)])
    task = DriftTask(steps=2)
    assert task.is_correct("3 * 4 = 1 2 then 1 2 + 1 2 = 2 4 . the answer is 2 4 .", p)
    assert task.is_correct("4 * 3 gives 1 2 next 1 2 + 1 2 gives 2 4 . result : 2 4 .", p)
    assert not task.is_correct("3 * 4 = 1 2 then 1 2 + 1 2 = 2 5 . the answer is 2 5 .", p)
    assert not task.is_correct("3 * 4 = 1 2", p)
    assert extract_answer("the answer is 7 . result : 3 1 .") == "31"


PROMPT = "start with 3 , multiply by 4 , subtract 5 . what is the result ?"


@pytest.mark.parametrize(
    "prefix,kind",
    [
        ("", "surface"),  # the first operand of a multiplication: its order is free
        ("3", "reasoning"),  # the operator symbol is forced
        ("3 *", "reasoning"),  # so is the other operand
        ("3 * 4", "surface"),  # '=' or 'gives'
        ("4 * 3 gives", "reasoning"),  # the first digit of the result
        ("4 * 3 gives 1", "reasoning"),  # its second digit
        ("4 * 3 gives 1 2", "surface"),  # the connector
        ("4 * 3 gives 1 2 next", "reasoning"),  # subtraction: its first operand is forced
        ("4 * 3 gives 1 2 next 1 2 - 5 =", "reasoning"),
        ("4 * 3 gives 1 2 next 1 2 - 5 = 7", "surface"),  # complete: '.' comes next
        ("4 * 3 gives 1 2 next 1 2 - 5 = 7 .", "surface"),  # the closing phrase
        ("4 * 3 gives 1 2 next 1 2 - 5 = 7 . result :", "reasoning"),  # the final answer
        ("4 * 3 gives 1 3 next 1 3 - 5 = 8 . the answer is", "reasoning"),  # after a wrong result: its own value
        ("4 * 3 gives 1 3 next 1 3 - 5 = 8 . the answer is 8", "surface"),
        ("4 * 3 gives 1 2 then then", None),  # off the grammar
    ],
)
def test_choice_kinds_follow_the_trace_grammar(prefix: str, kind: str | None) -> None:
    assert choice_kind(PROMPT, prefix) == kind
    assert DriftTask().choice_kind("user " + PROMPT + " assistant", prefix) == kind  # chat-template words around it


def test_every_position_of_a_well_formed_trace_has_a_kind() -> None:
    task = DriftTask()
    problems = task.train_problems(200, seed=1)
    for style in ("teacher", "student"):
        for text, p in zip(task.sft_traces(problems, style, seed=0), problems, strict=True):
            words = text.split()
            kinds = [task.choice_kind(p.prompt, " ".join(words[:n])) for n in range(len(words))]
            assert None not in kinds, (text, kinds)
