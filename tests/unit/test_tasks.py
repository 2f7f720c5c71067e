"""Tasks: the synthetic task's problems, traces and checks; the math JSONL task on the real shared data; loading
tasks by 'module:attr'."""

from __future__ import annotations

import random

import pytest

from topd_megatron.tasks import Problem, Task, load_task
from topd_megatron.tasks.synthetic import STYLES, SyntheticTask, extract_answer, parse_prompt, render_solution


def test_problems_are_deterministic_distinct_and_held_out_problems_never_train() -> None:
    task = SyntheticTask()
    train = task.train_problems(3000, seed=0)
    assert train == task.train_problems(3000, seed=0)
    assert len({p.prompt for p in train}) == 3000
    held_out = task.eval_problems(200, seed=0)
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    assert not {p.prompt for p in held_out} & {p.prompt for p in task.train_problems(3000, seed=1)}


def test_teacher_traces_are_correct_and_styles_differ_only_in_surface_form() -> None:
    task = SyntheticTask()
    problems = task.train_problems(300, seed=0)
    teacher = task.sft_traces(problems, "teacher", seed=0)
    assert all(task.is_correct(t, p) for t, p in zip(teacher, problems, strict=True))
    uniform = STYLES["uniform"]
    rng = random.Random(0)
    for p in problems[:50]:
        start, ops = parse_prompt(p.prompt)
        text = render_solution(start, ops, uniform, rng)  # any phrasing, no slips: always correct
        assert task.is_correct(text, p)
    student = task.sft_traces(problems, "student", seed=0)
    wrong = sum(not task.is_correct(t, p) for t, p in zip(student, problems, strict=True))
    assert 0.2 < wrong / len(problems) < 0.7, "the student style slips in ~20% of steps (3 steps per problem)"
    assert sum("gives" in t for t in student) > 2 * sum("gives" in t for t in teacher)


def test_answer_extraction_and_checking() -> None:
    p = Problem(id="x", prompt="start with 2 , add 3 . what is the result ?", answer="5")
    task = SyntheticTask(steps=1)
    assert task.is_correct("2 + 3 = 5 . the answer is 5 .", p)
    assert task.is_correct("3 + 2 gives 5 . result : 5 .", p)
    assert not task.is_correct("2 + 3 = 6 . the answer is 6 .", p)
    assert not task.is_correct("2 + 3 = 5", p)
    assert extract_answer("the answer is 4 . result : 7 .") == "7"


def test_difficulty_knob() -> None:
    easy, hard = SyntheticTask(steps=1), SyntheticTask(steps=5, max_operand=15)
    assert all(len(parse_prompt(p.prompt)[1]) == 1 for p in easy.train_problems(20, 0))
    assert all(len(parse_prompt(p.prompt)[1]) == 5 for p in hard.train_problems(20, 0))
    with pytest.raises(ValueError, match="steps must be in 1..8"):
        SyntheticTask(steps=0)


def test_load_task() -> None:
    task = load_task("topd_megatron.tasks.synthetic:default")
    assert isinstance(task, Task) and task.name == "synthetic"
    with pytest.raises(ValueError, match="must look like"):
        load_task("topd_megatron.tasks.synthetic")
    with pytest.raises(ValueError, match="cannot import"):
        load_task("no_such_module:thing")
    with pytest.raises(ValueError, match="has no attribute"):
        load_task("topd_megatron.tasks.synthetic:nothing")
    with pytest.raises(ValueError, match="neither a Task nor a zero-argument factory"):
        load_task("topd_megatron.tasks.chains:apply_op")
    with pytest.raises(ValueError, match="is not a Task"):
        load_task("topd_megatron.tasks.chains:OPS")


def test_math_jsonl_task_on_the_shared_data() -> None:
    from topd_megatron.tasks.math_jsonl import grade

    task = load_task("topd_megatron.tasks.math_jsonl:dapo_math500")
    assert isinstance(task, Task)
    train = task.train_problems(50, seed=0)
    held_out = task.eval_problems(20, seed=0)
    assert len(train) == 50 and len(held_out) == 20 and "\\boxed{}" in train[0].prompt
    assert not {p.id for p in train} & {p.id for p in held_out}
    for p in held_out:
        assert task.is_correct(f"Some reasoning. The final answer is \\boxed{{{p.answer}}}.", p), p.answer
    assert grade("so we get \\boxed{0.5}", "\\frac{1}{2}")
    assert not grade("so we get \\boxed{3}", "\\frac{1}{2}")
    traces = task.sft_traces(held_out[:3], "teacher", seed=0)
    assert all(isinstance(t, str) and t for t in traces), "MATH-500 rows carry solutions"


def test_math_jsonl_task_rejects_bad_files(tmp_path) -> None:
    from topd_megatron.tasks.math_jsonl import MathJsonlTask

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "problem": "1+1?"}\n')
    task = MathJsonlTask(train_path=str(bad), eval_path=str(bad))
    with pytest.raises(ValueError, match=r"bad.jsonl:1 lacks \['answer'\]"):
        task.train_problems(1, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        MathJsonlTask(train_path=str(tmp_path / "none.jsonl"), eval_path=str(bad)).train_problems(1, 0)


def test_a_chain_task_must_say_how_it_writes() -> None:
    """ChainTask is the shared machinery only: a task that does not say how it writes prompts, solutions, answers
    and numbers cannot be made (instead of failing later, mid-preparation)."""
    from topd_megatron.tasks.chains import ChainTask

    with pytest.raises(TypeError, match="abstract methods 'extract_answer', 'number_words', 'parse_prompt'"):
        ChainTask()
    assert SyntheticTask().render_prompt(3, [("add", 4)]) == "start with 3 , add 4 . what is the result ?"
