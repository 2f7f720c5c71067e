"""`topd eval` end to end on tiny Qwen3 models with the real Qwen3 tokenizer (151k vocabulary) and chat template.

Through a real SGLang server on CPU (2 data-parallel ranks, `topd eval` arguments): AIME24 and GSM8K, 3 problems each,
k=2; the records, summary (avg@k, unbiased pass@j, standard errors, status counts, macro average, sampling
parameters) and plot are checked against each other and against the formulas, not against expected accuracies (a
random model scores 0). Through the embedded engine (TP=2): a model whose weights make "7" the only likely token, so
every completion is 7s and a benchmark whose references are 7s is answered correctly by construction, graded by the
real pipeline. The command's input errors exit 2 before any rank starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from topd_megatron.distributed.launch import spawn
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation import cli
from topd_megatron.evaluation.benchmarks import load_benchmark
from topd_megatron.evaluation.runner import STATUSES, EvalRunConfig, run_eval

TOKENIZER = SHARED_DATA / "tokenizers" / "qwen3-4b-2507"
SEVEN = "7"


@pytest.fixture(scope="module")
def random_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 64-wide Qwen3 over the real Qwen3 tokenizer (151,680 embedding rows, ~20M parameters)."""
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    spec = TinyModelSpec(family="qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=5)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval-models") / "random", spec, TOKENIZER)


@pytest.fixture(scope="module")
def sevens_qwen3(random_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model with three changes that make token "7" win at every position, whatever the context: the
    embedding writes a constant 10 into hidden dimension 0 and no layer writes to it (row 0 of every o_proj and
    down_proj is zero), the final norm keeps only that dimension, and the output layer maps it to "7" alone (logit
    ~160, every other logit 0). Sampled at any temperature, its completions are 7s."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("eval-models") / "sevens"
    shutil.copytree(random_qwen3, out)
    seven = AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids(SEVEN)
    w = load_file(out / "model.safetensors")
    w["model.embed_tokens.weight"][:, 0] = 10.0
    for name, t in w.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[0, :] = 0.0
    w["model.norm.weight"].copy_(torch.nn.functional.one_hot(torch.tensor(0), 64).float())
    w["lm_head.weight"].zero_()
    w["lm_head.weight"][seven, 0] = 20.0
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="topd eval")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def _stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _pass_at(n: int, c: int, j: int) -> float:
    return 1.0 if n - c < j else 1.0 - math.comb(n - c, j) / math.comb(n, j)


def check_report(summary: dict, out: Path, k: int, limit: int) -> dict[str, list[dict]]:
    """Records well formed and consistent with their grades; the summary's numbers recomputed from the records."""
    assert (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    records: dict[str, list[dict]] = {}
    for name, b in summary["benchmarks"].items():
        path = out / b["records"]
        rs = [json.loads(line) for line in path.read_text().splitlines()]
        records[name] = rs
        assert b["problems"] == len(rs) == limit and b["samples"] == limit * k
        for r in rs:
            for key in ("completions", "extracted", "statuses", "correct", "response_tokens", "finished"):
                assert len(r[key]) == k, (name, r["id"], key)
            assert all(isinstance(c, str) for c in r["completions"])
            assert all(s in STATUSES for s in r["statuses"])
            assert r["correct"] == [s == "correct" for s in r["statuses"]]
            assert all((e is None) == (s == "no_answer") for e, s in zip(r["extracted"], r["statuses"], strict=True))
            maxn = summary["sampling"]["max_new_tokens"]
            assert all(1 <= n <= maxn for n in r["response_tokens"])
            assert all(f or n == maxn for f, n in zip(r["finished"], r["response_tokens"], strict=True))
        per_problem = [sum(r["correct"]) / k for r in rs]
        assert b[f"avg@{k}"] == pytest.approx(sum(per_problem) / len(rs), abs=1e-12)
        assert b[f"avg@{k}_stderr"] == pytest.approx(_stderr(per_problem), abs=1e-12)
        for j in [2**i for i in range(k.bit_length()) if 2**i < k] + [k]:
            values = [_pass_at(k, sum(r["correct"]), j) for r in rs]
            assert b[f"pass@{j}"] == pytest.approx(sum(values) / len(values), abs=1e-12), (name, j)
            assert b[f"pass@{j}_stderr"] == pytest.approx(_stderr(values), abs=1e-12)
        assert b["statuses"] == {s: sum(r["statuses"].count(s) for r in rs) for s in STATUSES}
        assert sum(b["statuses"].values()) == limit * k
        assert b["truncated"] == sum(not f for r in rs for f in r["finished"])
    macro = summary["macro"]
    assert macro["benchmarks"] == len(records)
    means = [b[f"avg@{k}"] for b in summary["benchmarks"].values()]
    assert macro[f"avg@{k}"] == pytest.approx(sum(means) / len(means), abs=1e-12)
    assert macro[f"pass@{k}"] == pytest.approx(
        sum(b[f"pass@{k}"] for b in summary["benchmarks"].values()) / len(means), abs=1e-12
    )
    return records


def test_eval_through_sglang_writes_a_well_formed_report(random_qwen3: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["--model", str(random_qwen3), "--benchmarks", "aime24,gsm8k", "--k", "2", "--max-new-tokens", "8"]
    argv += ["--temperature", "0.7", "--top-p", "0.9", "--seed", "11", "--limit", "3", "--rollout", "sglang"]
    argv += ["--dp", "2", "--dtype", "float32", "--out-dir", str(out), "--plot", "--timeout", "900"]
    assert _cli(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = check_report(summary, out, k=2, limit=3)
    for name in ("aime24", "gsm8k"):  # gathered from two data-parallel replicas back into the benchmark's order
        bench = load_benchmark(name)
        assert [(r["id"], r["reference"]) for r in records[name]] == [(p.id, p.answer) for p in bench.problems[:3]]
        assert summary["benchmarks"][name]["rule"] == bench.rule
    assert summary["model"] == str(random_qwen3) and summary["rollout"] == "sglang"
    assert summary["sampling"] == {
        "k": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 8,
        "seed": 11,
        "stop_token_ids": [151645],
    }
    assert summary["layout"] == {"tp": 1, "pp": 1, "dp": 2, "world": 2}
    assert (out / summary["plot"]).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "macro average" in printed and "aime24" in printed and "gsm8k" in printed and "pass@2" in printed
    logs = list((out / "sglang").glob("sglang-student-*.log"))
    assert len(logs) == 1
    port = logs[0].stem.rsplit("-", 1)[1]
    survivors = [a for a in os.popen("ps -eo args").read().splitlines() if "sglang" in a and f"--port {port}" in a]
    assert not survivors, f"the eval's server outlived it: {survivors}"


def test_embedded_eval_grades_a_model_that_answers_by_construction(sevens_qwen3: Path, tmp_path: Path) -> None:
    """TP=2, embedded engine. A file benchmark with the GSM8K rule whose references are "777777", "12", "777777":
    every completion is six 7s, so avg@2 = pass@1 = pass@2 = 2/3 exactly; on GSM8K every answer is 777777, wrong."""
    bench = tmp_path / "sevens.jsonl"
    rows = [("s1", "777777"), ("s2", "12"), ("s3", "777777")]
    bench.write_text("".join(json.dumps({"id": i, "problem": f"Problem {i}?", "answer": a}) + "\n" for i, a in rows))
    cfg = EvalRunConfig(
        model=str(sevens_qwen3),
        benchmarks=(f"{bench}:gsm8k", "gsm8k"),
        k=2,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=6,
        seed=3,
        rollout="embedded",
        parallel=ParallelConfig(tp=2),
        dtype="float32",
        out_dir=str(tmp_path / "eval"),
        limit=3,
    )
    results = spawn(run_eval, 2, (cfg,), timeout=600)
    assert results[1] is None
    summary = results[0]
    records = check_report(summary, tmp_path / "eval", k=2, limit=3)
    for rs in records.values():
        assert all(c == SEVEN * 6 for r in rs for c in r["completions"]), [r["completions"] for r in rs]
    s = summary["benchmarks"]["sevens"]
    assert [r["correct"] for r in records["sevens"]] == [[True, True], [False, False], [True, True]]
    assert s["avg@2"] == s["pass@1"] == s["pass@2"] == pytest.approx(2 / 3)
    assert s["statuses"] == {"correct": 4, "incorrect": 2, "no_answer": 0, "unparsable": 0, "timeout": 0}
    g = summary["benchmarks"]["gsm8k"]
    assert g["avg@2"] == 0.0 and g["statuses"]["incorrect"] == 6
    assert summary["macro"]["avg@2"] == pytest.approx(1 / 3)
    assert s["truncated"] == g["truncated"] == 6 and "plot" not in summary


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "missing"}, "does not exist"),
        ({"--benchmarks": "aime24,aime99"}, "unknown benchmark 'aime99'"),
        ({"--benchmarks": "nowhere/mine.jsonl"}, "does not exist"),
        ({"--k": "0"}, "k (samples per problem) must be >= 1, got 0"),
        ({"--tp": "3"}, "TP=3 does not divide num_attention_heads=4"),
        ({"--enable-thinking": None}, "does not read it"),
    ],
)
def test_bad_input_exits_2_before_any_rank_starts(random_qwen3: Path, tmp_path: Path, capsys, change, message) -> None:
    args = {"--model": str(random_qwen3), "--benchmarks": "aime24", "--k": "2", "--out-dir": str(tmp_path / "out")}
    args.update(change)
    if args["--model"] == "missing":
        args["--model"] = str(tmp_path / "no-such-model")
    argv = [x for key, value in args.items() for x in ((key,) if value is None else (key, value))]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("topd eval: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_pass_at_j_is_reported_for_k_and_the_powers_of_two_below_it() -> None:
    def ks(k: int, powers: bool = True) -> tuple[int, ...]:
        return EvalRunConfig(model="m", k=k, pass_at_powers_of_two=powers).pass_ks

    assert ks(1) == (1,) and ks(2) == (1, 2) and ks(6) == (1, 2, 4, 6) and ks(16) == (1, 2, 4, 8, 16)
    assert ks(16, powers=False) == (16,)
