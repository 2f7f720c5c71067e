"""Benchmarks: the problems an evaluation asks, their reference answers, and how answers are stated.

    load_benchmark("math500")                   registered: aime24, aime25, math500, gsm8k (shared-data JSONL)
    load_benchmark("math500", source="hub")     the same benchmark from its Hugging Face dataset (`datasets`)
    load_benchmark("path/to/mine.jsonl")        your own file (schema below); rule "boxed" unless you pass one
    load_hub_benchmark(HubSource(...), name=..., rule=...)   any hub dataset, with a field mapping

JSONL schema (the shared-data one): one object per line, {"id": str, "problem": str, "answer": str, "source": str};
`source` is optional, other fields are ignored, a number as `id` or `answer` is read as its decimal string.

The hub path needs network access to the Hugging Face hub, which the test machines do not have: it is kept to one
`datasets.load_dataset` call plus the same row checks as files, and it is not exercised by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from topd_megatron.evaluation.extract import ANSWER_RULES, AnswerRule
from topd_megatron.paths import shared_data_dir


@dataclass(frozen=True, slots=True)
class BenchmarkProblem:
    """One benchmark problem."""

    id: str
    problem: str
    """The problem statement (the instruction is added by `prompting`)."""
    answer: str
    """Reference final answer, compared by value (`grading`)."""
    source: str = ""


@dataclass(frozen=True, slots=True)
class Benchmark:
    """A named list of problems and the rule its completions' final answers follow (`extract.AnswerRule`)."""

    name: str
    problems: tuple[BenchmarkProblem, ...]
    rule: AnswerRule = "boxed"

    def __post_init__(self) -> None:
        if self.rule not in ANSWER_RULES:
            raise ValueError(f"benchmark {self.name}: unknown answer rule {self.rule!r}; known: {ANSWER_RULES}")
        if not self.problems:
            raise ValueError(f"benchmark {self.name} has no problems")


@dataclass(frozen=True, slots=True)
class HubSource:
    """A Hugging Face dataset and the mapping of its columns onto BenchmarkProblem."""

    dataset: str
    split: str = "test"
    config: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    """Column holding a problem id; None numbers the rows."""


@dataclass(frozen=True, slots=True)
class RegisteredBenchmark:
    """A benchmark shipped with the project: a file in the shared data directory, and its hub equivalent."""

    file: str
    rule: AnswerRule
    hub: HubSource


BENCHMARKS: dict[str, RegisteredBenchmark] = {
    "aime24": RegisteredBenchmark(
        file="aime24.jsonl",
        rule="boxed",
        hub=HubSource(dataset="HuggingFaceH4/aime_2024", split="train", id_field="id"),
    ),
    "aime25": RegisteredBenchmark(
        file="aime25.jsonl", rule="boxed", hub=HubSource(dataset="math-ai/aime25", split="test", id_field="id")
    ),
    "math500": RegisteredBenchmark(
        file="math500.jsonl", rule="boxed", hub=HubSource(dataset="HuggingFaceH4/MATH-500", id_field="unique_id")
    ),
    # openai/gsm8k's `answer` is the whole worked solution ending in "#### N"; `_hub_answer` keeps N.
    "gsm8k": RegisteredBenchmark(
        file="gsm8k_test.jsonl",
        rule="gsm8k",
        hub=HubSource(dataset="openai/gsm8k", config="main", problem_field="question"),
    ),
}


def _as_text(value: Any) -> str | None:
    """A non-empty string field, or a number as its shortest decimal string (70.0, as some hub copies store AIME
    answers, becomes "70")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _problem(row: Any, where: str) -> BenchmarkProblem:
    """Check one row (`where` names the file and line, or the dataset and row, for the error)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("id", "problem", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing} (schema: id, problem, answer[, source])")
    ident, answer = _as_text(row["id"]), _as_text(row["answer"])
    problem = row["problem"] if isinstance(row["problem"], str) and row["problem"].strip() else None
    if ident is None or answer is None or problem is None:
        bad = {"id": ident, "problem": problem, "answer": answer}
        raise ValueError(
            f"{where}: "
            + ", ".join(f"{k}={row[k]!r}" for k, v in bad.items() if v is None)
            + ": problem must be a non-empty string, id and answer non-empty strings or numbers"
        )
    return BenchmarkProblem(id=ident, problem=problem, answer=answer, source=str(row.get("source", "")))


def _unique(problems: list[BenchmarkProblem], where: list[str]) -> tuple[BenchmarkProblem, ...]:
    seen: dict[str, str] = {}
    for p, w in zip(problems, where, strict=True):
        if p.id in seen:
            raise ValueError(f"{w}: duplicate id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = w
    return tuple(problems)


def read_benchmark(path: str | Path, *, name: str | None = None, rule: AnswerRule = "boxed") -> Benchmark:
    """A benchmark from a JSONL file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file {p} does not exist")
    problems, where = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        problems.append(_problem(row, f"{p}:{n}"))
        where.append(f"{p}:{n}")
    if not problems:
        raise ValueError(f"benchmark file {p} has no problems")
    return Benchmark(name=name or p.stem, problems=_unique(problems, where), rule=rule)


def _hub_answer(value: Any) -> Any:
    """GSM8K-style answers hold the solution and end in "#### N": keep N without thousands separators."""
    if isinstance(value, str) and "####" in value:
        return value.rsplit("####", 1)[1].strip().replace(",", "")
    return value


def load_hub_benchmark(
    source: HubSource, *, name: str, rule: AnswerRule = "boxed", cache_dir: str | Path | None = None
) -> Benchmark:
    """A benchmark from a Hugging Face dataset (needs the hub, or a populated `datasets` cache; `cache_dir` None is
    the `datasets` default). `source.dataset` may also be a local dataset directory."""
    import datasets

    rows = datasets.load_dataset(
        source.dataset, name=source.config, split=source.split, cache_dir=str(cache_dir) if cache_dir else None
    )
    problems, where = [], []
    for i, row in enumerate(rows):
        w = f"{source.dataset}[{source.split}] row {i}"
        mapped = {
            "id": row[source.id_field] if source.id_field else f"{name}-{i}",
            "problem": row[source.problem_field],
            "answer": _hub_answer(row[source.answer_field]),
            "source": source.dataset,
        }
        problems.append(_problem(mapped, w))
        where.append(w)
    return Benchmark(name=name, problems=_unique(problems, where), rule=rule)


def load_benchmark(
    spec: str, *, rule: AnswerRule | None = None, source: Literal["local", "hub"] = "local"
) -> Benchmark:
    """A registered benchmark by name (`BENCHMARKS`), or a JSONL file by path.

    `rule` overrides the registered rule (default "boxed" for files). `source="hub"` loads a registered benchmark
    from its Hugging Face dataset instead of the shared data directory.
    """
    if spec in BENCHMARKS:
        entry = BENCHMARKS[spec]
        if source == "hub":
            return load_hub_benchmark(entry.hub, name=spec, rule=rule or entry.rule)

        return read_benchmark(shared_data_dir() / entry.file, name=spec, rule=rule or entry.rule)
    if source == "hub":
        raise ValueError(f"source='hub' needs a registered name ({', '.join(BENCHMARKS)}); use load_hub_benchmark")
    if spec.endswith(".jsonl") or "/" in spec or Path(spec).is_file():
        return read_benchmark(spec, rule=rule or "boxed")
    raise ValueError(
        f"unknown benchmark {spec!r}: use a registered name ({', '.join(BENCHMARKS)}) or a path to a .jsonl file"
    )
