"""Evaluation on math benchmarks: which problems, how they are asked, how answers are graded.

benchmarks.py   Benchmark: registered names (aime24, aime25, math500, gsm8k), your JSONL files, hub datasets
prompting.py    the user turn (problem + instruction) rendered with the model's own chat template
extract.py      the final-answer text of a completion under a benchmark's answer rule
grading.py      that answer against the reference with math-verify: Grade(correct, status, extracted)
"""

from topd_megatron.evaluation.benchmarks import (
    BENCHMARKS,
    Benchmark,
    BenchmarkProblem,
    HubSource,
    load_benchmark,
    load_hub_benchmark,
    read_benchmark,
)
from topd_megatron.evaluation.extract import ANSWER_RULES, AnswerRule, extract_answer
from topd_megatron.evaluation.grading import Grade, GradeStatus, grade, grade_answer, grade_detailed
from topd_megatron.evaluation.prompting import DEFAULT_INSTRUCTION, PromptConfig, render_prompt, render_prompts

__all__ = [
    "ANSWER_RULES",
    "BENCHMARKS",
    "DEFAULT_INSTRUCTION",
    "AnswerRule",
    "Benchmark",
    "BenchmarkProblem",
    "Grade",
    "GradeStatus",
    "HubSource",
    "PromptConfig",
    "extract_answer",
    "grade",
    "grade_answer",
    "grade_detailed",
    "load_benchmark",
    "load_hub_benchmark",
    "read_benchmark",
    "render_prompt",
    "render_prompts",
]
