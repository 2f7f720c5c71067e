"""A task over math JSONL files (the shared-data schema: {"id", "problem", "answer", "source", "solution"?}).

    --task topd_megatron.tasks.math_jsonl:dapo_math500      DAPO-Math-17k prompts, MATH-500 held out
    MathJsonlTask(train_path="train.jsonl", eval_path="test.jsonl")   your own files

Prompts ask for the final answer in \\boxed{}; a completion is correct when its answer (the last \\boxed{}, else the
last "answer is ..." phrase) is mathematically equal to the reference (`topd_megatron.evaluation.grading`). SFT
traces are the rows' `solution` fields (rows without one are skipped), the same for every style.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from topd_megatron.paths import shared_data_dir
from topd_megatron.tasks import Problem

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, each checked for the fields a task needs."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"math task: {p} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"math task: {p}:{n} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"math task: {p}:{n} is not a JSON object (schema: id, problem, answer[, solution])")
        missing = [k for k in ("id", "problem", "answer") if k not in row]
        if missing:
            raise ValueError(f"math task: {p}:{n} lacks {missing} (schema: id, problem, answer[, solution])")
        rows.append(row)
    return rows


def grade(completion: str, reference: str) -> bool:
    """Whether `completion`'s final answer equals `reference` mathematically (math-verify, 5 s timeout each)."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$") or parse(reference)
    answer = parse(completion)
    return bool(gold) and bool(answer) and bool(verify(gold, answer))


@dataclass(kw_only=True)
class MathJsonlTask:
    train_path: str
    eval_path: str
    instruction: str = INSTRUCTION
    name: str = field(default="math_jsonl")

    @cached_property
    def _train(self) -> list[dict]:
        return read_jsonl(self.train_path)

    @cached_property
    def _eval(self) -> list[dict]:
        return read_jsonl(self.eval_path)

    def _problems(self, rows: list[dict], n: int, seed: int) -> list[Problem]:
        if n > len(rows):
            raise ValueError(f"math task: asked for {n} problems, the file has {len(rows)}")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        return [
            Problem(
                id=rows[i]["id"], prompt=f"{rows[i]['problem']}\n\n{self.instruction}", answer=str(rows[i]["answer"])
            )
            for i in order[:n]
        ]

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(self._train, n, seed)

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(self._eval, min(n, len(self._eval)), seed)

    def is_correct(self, completion: str, problem: Problem) -> bool:
        return grade(completion, problem.answer)

    def sft_traces(self, problems: list[Problem], style: str, seed: int) -> list[str]:
        by_id = {r["id"]: r for r in self._train + self._eval}
        return [by_id[p.id].get("solution", "") for p in problems]

    def tokenizer_corpus(self) -> list[str]:
        return [r["problem"] + "\n" + r.get("solution", "") for r in self._train[:5000]]


def dapo_math500() -> MathJsonlTask:
    """DAPO-Math-17k training prompts with MATH-500 held out, from the shared data directory."""
    data = shared_data_dir()
    return MathJsonlTask(
        train_path=str(data / "dapo_math_17k_train.jsonl"), eval_path=str(data / "math500.jsonl"), name="dapo_math500"
    )
