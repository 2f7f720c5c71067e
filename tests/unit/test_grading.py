"""Evaluation grading, benchmarks and prompting on the real shared data: every reference answer of AIME24, AIME25,
MATH-500 and GSM8K graded against itself, inside a completion, and against another problem's answer (checked
against an independent equality decision); the tricky equivalences; statuses and the timeout; benchmark loading
and its errors; prompts through the real Qwen2 and Qwen3 chat templates."""

from __future__ import annotations

import json
import re
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from topd_megatron.evaluation.benchmarks import (
    BENCHMARKS,
    HubSource,
    _hub_answer,
    load_benchmark,
    load_hub_benchmark,
    read_benchmark,
)
from topd_megatron.evaluation.extract import extract_answer
from topd_megatron.evaluation.grading import Grade, grade, grade_answer, grade_detailed
from topd_megatron.evaluation.prompting import DEFAULT_INSTRUCTION, PromptConfig, render_prompt
from topd_megatron.models.tokenizer import load_tokenizer

SIZES = {"aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1319}

KNOWN_SELF_GRADING_EXCEPTIONS: dict[str, str] = {}
"""Reference answers (benchmark:id -> reason) that math-verify cannot grade correct against themselves. None: every
shipped reference, in every form below, grades correct."""


# -- an equality decision independent of math-verify, for "reference vs another problem's answer" ---------------


def _canonical(answer: str) -> Fraction | str:
    """Exact value of a numeric answer (integers, decimals, plain fractions, with formatting stripped), else a
    whitespace- and formatting-free lower-case string. Two answers are taken as equal iff these are equal."""
    s = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\u2212", "-")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|!|,|\$)|\{,\}|\^\\circ|\^\{\\circ\}|\\%|\s", "", s)
    s = re.sub(r"^[a-zA-Z]=(?=[^=]*$)", "", s)  # "x=5" states the value 5 (graded so on purpose)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return Fraction(s)
    frac = re.fullmatch(r"(-?)\\frac\{?(\d+)\}?\{?(\d+)\}?", s)
    if frac:
        return Fraction(int(frac.group(2)), int(frac.group(3))) * (-1 if frac.group(1) else 1)
    return s.lower()


def test_canonical_decides_equality_independently() -> None:
    assert _canonical("10,\\!080") == _canonical("10080") == Fraction(10080)
    assert _canonical("\\dfrac{3}{4}") == _canonical("0.75") == _canonical("\\frac34")
    assert _canonical("x=5") == _canonical("5") and _canonical("90^\\circ") == _canonical("90")
    assert _canonical("\\text{(B)}") == "(b)" and _canonical("(1, 2)") == _canonical("(1,2)")
    assert _canonical("2") != _canonical("3") and _canonical("x+1") != _canonical("x-1")


# -- the real reference answers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmarks() -> dict:
    return {name: load_benchmark(name) for name in BENCHMARKS}


def test_registered_benchmarks_load_from_the_shared_data(benchmarks: dict) -> None:
    assert {n: len(b.problems) for n, b in benchmarks.items()} == SIZES
    assert {n: b.rule for n, b in benchmarks.items()} == {
        "aime24": "boxed",
        "aime25": "boxed",
        "math500": "boxed",
        "gsm8k": "gsm8k",
    }
    assert benchmarks["aime24"].problems[0].id == "2024-I-1" and benchmarks["aime24"].problems[0].answer == "204"
    for b in benchmarks.values():
        assert len({p.id for p in b.problems}) == len(b.problems)
        assert all(p.problem and p.answer for p in b.problems)


@pytest.mark.parametrize("name", list(SIZES))
def test_every_reference_grades_correct_against_itself_and_inside_a_completion(benchmarks: dict, name: str) -> None:
    bench = benchmarks[name]
    failures = []
    for p in bench.problems:
        forms = {
            "itself": grade_answer(p.answer, p.answer),
            "boxed": grade_detailed(f"Let me work it out... so the answer is \\boxed{{{p.answer}}}.", p.answer),
        }
        if bench.rule == "gsm8k":
            forms["####"] = grade_detailed(
                f"She buys 3 boxes of 12 and pays $4.50 each.\n#### {p.answer}", p.answer, rule="gsm8k"
            )
            forms["rule boxed"] = grade_detailed(f"so \\boxed{{{p.answer}}}", p.answer, rule="gsm8k")
        for form, g in forms.items():
            if not g.correct and f"{name}:{p.id}" not in KNOWN_SELF_GRADING_EXCEPTIONS:
                failures.append((p.id, p.answer, form, g))
    assert not failures, failures


@pytest.mark.parametrize("name", list(SIZES))
def test_references_against_another_problems_answer(benchmarks: dict, name: str) -> None:
    """Each reference against the next problem's reference (cyclic), graded both ways: correct exactly when the two
    are equal by `_canonical` (integers repeat in GSM8K; MATH-500 has `5` next to `x=5`)."""
    problems = benchmarks[name].problems
    disagreements, equal_pairs = [], 0
    for i, p in enumerate(problems):
        other = problems[(i + 1) % len(problems)].answer
        expected = _canonical(other) == _canonical(p.answer)
        equal_pairs += expected
        forward, backward = grade_answer(other, p.answer), grade_answer(p.answer, other)
        if forward.correct != expected or backward.correct != expected:
            disagreements.append((p.id, p.answer, other, expected, forward.status, backward.status))
        if not expected:
            assert forward.status == "incorrect", (p.answer, other, forward)
    assert not disagreements, disagreements
    assert equal_pairs < len(problems) // 20, "the pairing should mostly compare different answers"
    if name in ("math500", "gsm8k"):
        assert equal_pairs > 0, "these benchmarks repeat answers next to each other: the equal case is exercised"


# -- equivalences, negatives and statuses ----------------------------------------------------------------------

EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "0.5"),
    ("\\dfrac{3}{4}", "3/4"),
    ("50\\%", "50"),
    ("50", "50\\%"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("90°", "90"),
    ("(1,2)", "(1, 2)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("1{,}000", "1000"),
    ("1,000", "1000"),
    ("1\\,000", "1000"),
    ("10,\\!080", "10080"),
    ("\\$32,\\!348", "32348"),
    ("\\text{(B)}", "B"),
    ("\\text{(B)}", "(B)"),
    ("\\text{(B)}", "\\textbf{(B)}"),
    ("\\text{Evelyn}", "\\text{evelyn}"),
    ("025", "25"),
    ("25", "025"),
    ("-3", "\u22123"),
    ("5.4 \\text{ cents}", "5.4"),
    ("864 \\mbox{ inches}^2", "864"),
    ("1\\frac{4}{5}", "\\frac{9}{5}"),
    ("x=5", "5"),
    ("3, 5, 7", "7, 5, 3"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"),
    ("(-\\infty, 0]", "(-\\infty,0]"),
    (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
        "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\end{pmatrix}",
    ),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("$\\frac{1}{2}$", "0.5"),
    ("18.90", "18.9"),
]
DIFFERENT = [
    ("2", "3"),
    ("x+1", "x-1"),
    ("\\text{(B)}", "C"),
    ("(1,2)", "[1,2]"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("-3", "3"),
    ("1000", "100"),
    ("\\text{east}", "\\text{west}"),
]


@pytest.mark.parametrize(("reference", "answer"), EQUIVALENT)
def test_equivalent_forms_grade_correct(reference: str, answer: str) -> None:
    g = grade_detailed(f"Therefore the answer is \\boxed{{{answer}}}.", reference)
    assert g == Grade(correct=True, status="correct", extracted=answer)


@pytest.mark.parametrize(("reference", "answer"), DIFFERENT)
def test_different_answers_grade_incorrect(reference: str, answer: str) -> None:
    g = grade_detailed(f"\\boxed{{{answer}}}", reference)
    assert (g.correct, g.status, g.extracted) == (False, "incorrect", answer)


def test_statuses_no_answer_and_unparsable() -> None:
    for completion in ("I am not sure.", "", "so the answer is \\boxed{}", "thus \\boxed{\\frac{1}{2"):
        assert grade_detailed(completion, "5") == grade_detailed("I am not sure.", "5")
        assert grade_detailed(completion, "5").status == "no_answer"
        assert grade_detailed(completion, "5").extracted is None
    for garbage in ("@#!", ")(", "\\frac{}{}"):
        g = grade_detailed(f"\\boxed{{{garbage}}}", "5")
        assert (g.correct, g.status, g.extracted) == (False, "unparsable", garbage)
    assert grade_answer("   ", "5").status == "no_answer"
    with pytest.raises(ValueError, match="empty reference"):
        grade_answer("5", "")


def test_pathological_answers_are_bounded_by_the_timeout() -> None:
    for answer in ("9^{9^{9^{9^{9}}}}", "{" * 400 + "1" + "}" * 400):
        start = time.monotonic()
        g = grade_detailed(f"\\boxed{{{answer}}}", "1", timeout_s=1)
        elapsed = time.monotonic() - start
        assert (g.correct, g.status, g.extracted) == (False, "timeout", answer)
        assert elapsed < 4.0, f"one parse plus one comparison, each bounded by 1 s; took {elapsed:.1f} s"
    assert grade_detailed("\\boxed{2}", "2", timeout_s=1).correct, "the grader works after a timeout"


def test_timeouts_need_the_main_thread_and_none_grades_anywhere() -> None:
    results: dict[str, object] = {}

    def worker() -> None:
        results["none"] = grade_detailed("\\boxed{0.5}", "\\frac{1}{2}", timeout_s=None).correct
        try:
            grade_detailed("\\boxed{0.5}", "\\frac{1}{2}")
        except ValueError as e:
            results["error"] = str(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert results["none"] is True
    assert "main thread" in str(results["error"])
    with pytest.raises(ValueError, match="whole number of seconds"):
        grade_detailed("\\boxed{1}", "1", timeout_s=0)


# -- extraction --------------------------------------------------------------------------------------------------


def test_boxed_extraction() -> None:
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}} done") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("\\fbox{42}") == "42" and extract_answer("$\\boxed 7$.") == "7"
    assert extract_answer("\\boxed {\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("\\boxed{3} and finally \\boxed{4") is None, "an unclosed last box is no answer"
    assert extract_answer("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.") == "$\\frac{1}{2}$"
    assert extract_answer("**Answer:** 0.5.") == "0.5"
    assert extract_answer("We get 12 and then 13.") is None, "the boxed rule has no last-number fallback"
    with pytest.raises(ValueError, match="unknown answer rule"):
        extract_answer("\\boxed{1}", "last_number")  # type: ignore[arg-type]


def test_gsm8k_extraction() -> None:
    assert extract_answer("He has 3 apples.\n#### 1,234", "gsm8k") == "1234"
    assert extract_answer("The answer is 18 dollars. Check: 2 + 16.", "gsm8k") == "18"
    assert extract_answer("She pays $18.50 in total.", "gsm8k") == "18.50"
    assert extract_answer("It drops 5 - 8 = \u22123 degrees, so -3", "gsm8k") == "-3"
    assert extract_answer("From 5-3 we get 2", "gsm8k") == "2", "a subtraction is not a negative number"
    assert extract_answer("#### 7 but \\boxed{8}", "gsm8k") == "8", "a box comes first"
    assert extract_answer("no numbers here", "gsm8k") is None
    assert grade_detailed("so she makes $1,000.", "1000", rule="gsm8k").correct
    assert not grade_detailed("#### 999", "1000", rule="gsm8k").correct


def test_public_grade_and_the_math_task_agree() -> None:
    from topd_megatron.tasks.math_jsonl import grade as task_grade

    for completion, reference, expected in [
        ("so \\boxed{0.5}", "\\frac{1}{2}", True),
        ("so \\boxed{3}", "\\frac{1}{2}", False),
        ("The answer is $\\frac{1}{2}$.", "0.5", True),
        ("nothing", "1", False),
    ]:
        assert grade(completion, reference) is expected
        assert task_grade(completion, reference) is expected


# -- benchmark files and their errors --------------------------------------------------------------------------


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_benchmark_files(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "mine.jsonl",
        [{"id": "a", "problem": "1+1?", "answer": "2"}, "", {"id": 7, "problem": "Half?", "answer": 0.5, "x": 1}],
    )
    b = load_benchmark(str(f), rule="gsm8k")
    assert (b.name, b.rule, [p.id for p in b.problems], [p.answer for p in b.problems]) == (
        "mine",
        "gsm8k",
        ["a", "7"],
        ["2", "0.5"],
    )
    assert read_benchmark(f).rule == "boxed"
    assert load_benchmark("aime24", rule="gsm8k").rule == "gsm8k"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"id": "a", "problem": "p", "answer": "1"}', "{not json"], r"bad.jsonl:2: not valid JSON"),
        ([{"id": "a", "problem": "p"}], r"bad.jsonl:1: missing \['answer'\]"),
        ([{"id": "a", "problem": "  ", "answer": "1"}], r"bad.jsonl:1: problem='  '"),
        ([{"id": "a", "problem": "p", "answer": True}], r"bad.jsonl:1: answer=True"),
        ([[1, 2]], r"bad.jsonl:1: expected a JSON object"),
        ([{"id": "a", "problem": "p", "answer": "1"}] * 2, r"bad.jsonl:2: duplicate id 'a' \(first at .*bad.jsonl:1\)"),
        ([""], r"has no problems"),
    ],
)
def test_bad_benchmark_rows_name_the_file_and_line(tmp_path: Path, rows: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_benchmark(str(_write(tmp_path / "bad.jsonl", rows)))


def test_unknown_and_missing_benchmarks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown benchmark 'aime23'.*aime24, aime25, math500, gsm8k"):
        load_benchmark("aime23")
    with pytest.raises(FileNotFoundError, match="none.jsonl does not exist"):
        load_benchmark(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="needs a registered name"):
        load_benchmark(str(tmp_path / "x.jsonl"), source="hub")
    with pytest.raises(ValueError, match="unknown answer rule"):
        read_benchmark(SHARED_DATA / "aime24.jsonl", rule="exact")  # type: ignore[arg-type]


def test_hub_mapping_reproduces_the_shipped_gsm8k_answers(benchmarks: dict) -> None:
    """openai/gsm8k's `answer` column is the worked solution ending in "#### N" (kept in our rows' `solution`)."""
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    assert [_hub_answer(r["solution"]) for r in rows] == [p.answer for p in benchmarks["gsm8k"].problems]
    assert _hub_answer(70.0) == 70.0 and _hub_answer("\\frac{1}{2}") == "\\frac{1}{2}"


def test_hub_loader_on_a_local_dataset_directory(tmp_path: Path) -> None:
    """The hub path is one `datasets.load_dataset` call; a local directory exercises it without network."""
    data = tmp_path / "gsm8k_like"
    data.mkdir()
    _write(
        data / "test.jsonl",
        [
            {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
            {"question": "1000+234?", "answer": "It is 1,234.\n#### 1,234"},
        ],
    )
    source = HubSource(dataset=str(data), problem_field="question")
    b = load_hub_benchmark(source, name="tiny", rule="gsm8k", cache_dir=tmp_path / "cache")
    assert [(p.id, p.problem, p.answer) for p in b.problems] == [
        ("tiny-0", "2+2?", "4"),
        ("tiny-1", "1000+234?", "1234"),
    ]


# -- prompting with the real tokenizers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer(SHARED_DATA / "tokenizers" / "qwen2-1.5b-instruct")


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer(SHARED_DATA / "tokenizers" / "qwen3-4b-2507")


PROBLEM = "What is $1+1$?"


def test_qwen2_chat_template(qwen2) -> None:
    prompt = render_prompt(PromptConfig(), qwen2, PROBLEM)
    user = f"<|im_start|>user\n{PROBLEM}\n\n{DEFAULT_INSTRUCTION}<|im_end|>\n"
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"), "the template's default"
    assert prompt.endswith(user + "<|im_start|>assistant\n")
    custom = render_prompt(PromptConfig(system="Be brief.", instruction="Answer in \\boxed{}."), qwen2, PROBLEM)
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "You are a helpful" not in custom
    assert f"{PROBLEM}\n\nAnswer in \\boxed{{}}.<|im_end|>" in custom
    assert f"user\n{PROBLEM}<|im_end|>" in render_prompt(PromptConfig(instruction=""), qwen2, PROBLEM)
    ids = qwen2(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(qwen2.convert_tokens_to_ids("<|im_start|>")) == 3, "chat markers are single special tokens"
    with pytest.raises(ValueError, match="does not read it"):
        render_prompt(PromptConfig(enable_thinking=False), qwen2, PROBLEM)


def test_qwen3_thinking_2507_template_always_opens_think(qwen3) -> None:
    prompt = render_prompt(PromptConfig(), qwen3, PROBLEM)
    assert prompt == f"<|im_start|>user\n{PROBLEM}\n\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    with pytest.raises(ValueError, match="does not read it"):
        render_prompt(PromptConfig(enable_thinking=False), qwen3, PROBLEM)


def test_qwen3_hybrid_template_enable_thinking(qwen3) -> None:
    """The shipped Qwen3 config is the 2507 Thinking release, whose template ignores `enable_thinking`. The hybrid
    Qwen3 releases differ only in the generation prompt: `enable_thinking=False` pre-fills an empty think block.
    That tail is swapped in here, on the real Qwen3 tokenizer, to check the switch reaches the template."""
    thinking_tail = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}"
    hybrid_tail = (
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
    )
    original = qwen3.chat_template
    assert original.endswith(thinking_tail)
    qwen3.chat_template = original[: -len(thinking_tail)] + hybrid_tail
    try:
        on = render_prompt(PromptConfig(enable_thinking=True), qwen3, PROBLEM)
        off = render_prompt(PromptConfig(enable_thinking=False), qwen3, PROBLEM)
        default = render_prompt(PromptConfig(), qwen3, PROBLEM)
    finally:
        qwen3.chat_template = original
    assert on != off and on == default
    assert on.endswith(f"{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"
