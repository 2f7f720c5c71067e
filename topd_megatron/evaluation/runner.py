"""`topd eval`: sample k completions per benchmark problem through a rollout engine, grade them, report avg@k/pass@k.

    cfg = EvalRunConfig(model="ckpts/qwen3-1p7b", benchmarks=("aime24", "aime25"), k=16, out_dir="runs/eval/q3")
    report = run_ranks(run_eval, cfg.parallel.tp * cfg.parallel.pp * dp, cfg, timeout=...)   # or torchrun/srun

Each rank of the job calls `run_eval(rank, world, cfg)`. In order:

1. every benchmark is loaded (`load_benchmark`; `limit` keeps its first problems) and each problem is rendered with
   the model's own chat template (`prompting.render_prompt`, tokenizer from the model directory);
2. the model is built (Megatron-Core, `parallel` layout) and the rollout engine started on it: 'sglang' serves the
   checkpoint's own weights (a topd checkpoint's server starts empty and gets the weights pushed once), 'embedded'
   samples in-process; there is no teacher and no weight sync after that;
3. problems are split over the data-parallel replicas (world = tp * pp * dp; replica r takes problems r, r + dp,
   ...); each replica samples k completions per problem (one `generate` call per benchmark, every replica calls it
   even with no problems, as the engines' collectives require);
4. the completions are graded with `grade_detailed` under the benchmark's answer rule: the ranks of a replica split
   the grading between them, global rank 0 gathers every graded sample;
5. global rank 0 writes `records/<benchmark>.jsonl` (one line per problem: id, reference, the k completions, their
   extracted answers, statuses, correct flags, response lengths, whether a stop token ended them), `summary.json`
   (per benchmark avg@k, pass@j for j = k and the powers of two below it, standard errors over problems, status
   counts; the macro average over benchmarks; the sampling parameters, prompt, model and layout) and, with `plot`,
   `avg_at_k.png`; it returns the summary, the other ranks return None.

Samples are reproducible for a given seed, model, layout and engine; the stream of a (benchmark, replica) pair is
seeded from all three, so a different data-parallel size draws different samples.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from topd_megatron.analysis.plots import pyplot
from topd_megatron.choices import check_choices
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.benchmarks import Benchmark, load_benchmark
from topd_megatron.evaluation.extract import ANSWER_RULES, AnswerRule
from topd_megatron.evaluation.grading import grade_detailed
from topd_megatron.evaluation.prompting import PromptConfig, render_prompt
from topd_megatron.evaluation.statistics import summarize
from topd_megatron.models.build import ModelConfig, check_layout
from topd_megatron.models.format import hf_dir
from topd_megatron.models.tokenizer import load_tokenizer
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.rollout.sglang.server import ServerConfig
from topd_megatron.seeds import benchmark_sample_seed
from topd_megatron.training.session import EngineSpec, rank_session

STATUSES = ("correct", "incorrect", "no_answer", "unparsable", "timeout")
"""The statuses a graded completion can have (`grading.GradeStatus`), in the order the summary counts them."""
SAMPLE_FIELDS = ("completions", "extracted", "statuses", "correct", "response_tokens", "finished")
"""Per-sample lists of a problem's record (k entries each): decoded text, extracted answer (None: no answer), grade
status, correct flag, response length in tokens, whether a stop token ended it (else max_new_tokens did)."""


@dataclass(kw_only=True, slots=True)
class EvalRunConfig:
    """One evaluation run: which model, which benchmarks, how completions are sampled and graded, where it goes."""

    model: str
    """A Hugging Face checkpoint directory or a topd checkpoint (its `hf/` holds the tokenizer and chat template)."""
    benchmarks: tuple[str, ...] = ("aime24", "aime25")
    """Registered names (aime24, aime25, math500, gsm8k) or JSONL paths, each optionally suffixed with `:RULE`
    (`mine.jsonl:gsm8k`) to choose the answer rule; files default to 'boxed'."""
    k: int = 16
    """Completions sampled per problem."""
    temperature: float = 0.6
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.95
    max_new_tokens: int = 32768
    """Longest completion; one cut off here counts as it stands (usually no_answer)."""
    seed: int = 0
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Instruction, system message and Qwen3's enable_thinking switch."""
    rollout: Literal["embedded", "sglang"] = "sglang"
    """'sglang': an SGLang server (the at-scale path); 'embedded': in-process sampling from the Megatron model
    (no KV cache: tiny models and tests)."""
    sglang: SGLangConfig | None = None
    """SGLang servers for rollout='sglang'; None: one student server on the model's own weights, in `dtype`."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron layout of the model (tp, pp); data parallelism is the rest of the world size."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    out_dir: str = "runs/eval"
    """Records, summary, plot and the SGLang server logs (`sglang/`)."""
    grade_timeout_s: int | None = 5
    """math-verify's bound on parsing and comparing one answer (whole seconds); None: unbounded."""
    limit: int | None = None
    """Keep only the first `limit` problems of every benchmark (smoke runs); None keeps all."""
    pass_at_powers_of_two: bool = True
    """Also report pass@j for the powers of two j below k (pass@1, pass@2, ...)."""
    micro_batch_size: int = 4
    """Sequences per forward of the embedded engine (each holds [sequence, vocabulary / tp] logits)."""
    plot: bool = False
    """Write avg_at_k.png: avg@k per benchmark with standard-error bars."""

    def __post_init__(self) -> None:
        if isinstance(self.benchmarks, str):
            raise ValueError(f"benchmarks must be a tuple of names or paths, got the string {self.benchmarks!r}")
        if not self.benchmarks:
            raise ValueError("no benchmarks given: name at least one (aime24, aime25, math500, gsm8k or a .jsonl)")
        if self.k < 1:
            raise ValueError(f"k (samples per problem) must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_choices(self)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for every problem), got {self.limit}")
        if self.grade_timeout_s is not None and self.grade_timeout_s < 1:
            raise ValueError(
                f"grade_timeout_s must be a whole number of seconds >= 1 or None, got {self.grade_timeout_s}"
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")

    @property
    def pass_ks(self) -> tuple[int, ...]:
        """The j of the reported pass@j: k, and the powers of two below it when `pass_at_powers_of_two`."""
        below = [2**i for i in range(self.k.bit_length()) if 2**i < self.k] if self.pass_at_powers_of_two else []
        return (*below, self.k)


# --- before any rank starts ---------------------------------------------------------------------------------------


def parse_benchmark_spec(spec: str) -> tuple[str, str | None]:
    """`NAME_OR_PATH[:RULE]` -> (name or path, rule or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in ANSWER_RULES and head:
        return head, tail
    return spec, None


def load_benchmarks(cfg: EvalRunConfig) -> list[Benchmark]:
    """The benchmarks of `cfg`, each cut to its first `limit` problems; names must be distinct (they name files)."""
    out: list[Benchmark] = []
    for spec in cfg.benchmarks:
        name, rule = parse_benchmark_spec(spec)
        bench = load_benchmark(name, rule=cast(AnswerRule | None, rule))
        if cfg.limit is not None:
            bench = Benchmark(name=bench.name, problems=bench.problems[: cfg.limit], rule=bench.rule)
        if any(b.name == bench.name for b in out):
            raise ValueError(f"two benchmarks are named {bench.name!r}; rename one of the files")
        out.append(bench)
    return out


def preflight(cfg: EvalRunConfig) -> list[Benchmark]:
    """Cheap checks that fail with one clear ValueError/FileNotFoundError before any rank starts: the checkpoint,
    the layout against the architecture, the benchmarks, and the prompt against the model's chat template."""
    from transformers import AutoConfig

    model_dir = hf_dir(cfg.model)
    check_layout(
        AutoConfig.from_pretrained(str(model_dir), local_files_only=True),
        cfg.parallel,
        ModelConfig(path=cfg.model, dtype=cfg.dtype),
        "model",
    )
    benchmarks = load_benchmarks(cfg)
    render_prompt(cfg.prompt, load_tokenizer(model_dir), benchmarks[0].problems[0].problem)
    return benchmarks


# --- on every rank ------------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer: Any, model_dir: Path) -> tuple[int, ...]:
    """Where a completion ends: the tokenizer's EOS and the ids of `generation_config.json`'s eos_token_id (Qwen's
    instruct models list both <|im_end|> and <|endoftext|> there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tuple(dict.fromkeys(int(i) for i in ids))


def student_server(dtype: str, *, tp: int = 1, url: str | None = None) -> SGLangConfig:
    """One SGLang server for the evaluated model: started on its own weights with `tp` ranks, or attached at `url`
    (whatever that server holds is replaced by the model's weights when the engine starts)."""
    import torch

    if url:
        return SGLangConfig(student=ServerConfig(role="student", url=url))
    # On GPUs SGLang sizes the KV cache from its memory share: long reasoning completions need more than the bounded
    # default meant for CPU servers.
    kv_cache = {"max_total_tokens": None} if torch.cuda.is_available() else {}
    return SGLangConfig(student=ServerConfig(role="student", model_path="<student>", tp=tp, dtype=dtype, **kv_cache))


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already wrote the special tokens (a BOS included, where the family has one).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_eval(rank: int, world: int, cfg: EvalRunConfig) -> dict[str, Any] | None:
    """Evaluate `cfg` on this rank (module docstring); returns the summary on global rank 0, None elsewhere."""
    t_start = time.perf_counter()
    benchmarks = load_benchmarks(cfg)
    model_dir = hf_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = {
        b.name: [_encode(tokenizer, render_prompt(cfg.prompt, tokenizer, p.problem)) for p in b.problems]
        for b in benchmarks
    }
    longest = max(len(ids) for bench_ids in prompts.values() for ids in bench_ids)
    model_cfg = ModelConfig(path=cfg.model, dtype=cfg.dtype, seq_length=longest + cfg.max_new_tokens)
    engine = EngineSpec(
        kind=cfg.rollout,
        micro_batch_size=cfg.micro_batch_size,
        sglang=cfg.sglang or student_server(cfg.dtype),
        run_dir=cfg.out_dir,
    )
    stops = stop_token_ids(tokenizer, model_dir)
    results: dict[str, tuple[list[dict[str, Any]], dict[str, float]]] = {}
    with rank_session(cfg.parallel, model_cfg, engine=engine) as session:
        timing = {"setup": time.perf_counter() - t_start}
        for bench in benchmarks:
            results[bench.name] = _evaluate_benchmark(cfg, bench, prompts[bench.name], session.engine, tokenizer, stops)
    if rank != 0:
        return None
    timing["total"] = time.perf_counter() - t_start
    summary = _write_report(cfg, benchmarks, results, stops, world, timing)
    return summary


def _evaluate_benchmark(
    cfg: EvalRunConfig,
    bench: Benchmark,
    prompt_ids: list[list[int]],
    engine: Any,
    tokenizer: Any,
    stops: tuple[int, ...],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample, grade and gather one benchmark (collective). Global rank 0 gets (records in benchmark order, seconds);
    the other ranks get ([], seconds)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(bench.problems), dp_size))
    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=stops,
        seed=benchmark_sample_seed(cfg.seed, bench.name, dp_rank),
    )
    t0 = time.perf_counter()
    gens = engine.generate([prompt_ids[i] for i in mine for _ in range(cfg.k)], params, model="student")
    t_generate = time.perf_counter() - t0
    # Every rank of the replica holds the same generations: each grades its own stripe of them.
    mp_group = ps.get_model_parallel_group()
    mp_rank, mp_size = dist.get_rank(mp_group), dist.get_world_size(mp_group)
    graded = []
    for j in range(mp_rank, len(gens), mp_size):
        problem, g = bench.problems[mine[j // cfg.k]], gens[j]
        text = tokenizer.decode(g.output_ids, skip_special_tokens=True)
        grade = grade_detailed(text, problem.answer, rule=bench.rule, timeout_s=cfg.grade_timeout_s)
        fields = {
            "completions": text,
            "extracted": grade.extracted,
            "statuses": grade.status,
            "correct": grade.correct,
            "response_tokens": len(g.output_ids),
            "finished": g.finished,
        }
        graded.append((mine[j // cfg.k], j % cfg.k, fields))
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(graded, gathered, dst=0)
    seconds = {"generate": t_generate, "grade": time.perf_counter() - t0 - t_generate}
    if gathered is None:
        return [], seconds
    records = [
        {"id": p.id, "reference": p.answer, **{key: [None] * cfg.k for key in SAMPLE_FIELDS}} for p in bench.problems
    ]
    # Replicas of more than one rank grade disjoint stripes; a sample seen twice would be a bug, not a duplicate.
    for part in gathered:
        for p, sample, fields in part:
            rec = records[p]
            if rec["statuses"][sample] is not None:
                raise RuntimeError(f"{bench.name} problem {rec['id']} sample {sample} was graded twice")
            for key, value in fields.items():
                rec[key][sample] = value
    missing = [(r["id"], s) for r in records for s in range(cfg.k) if r["statuses"][s] is None]
    if missing:
        raise RuntimeError(f"{bench.name}: {len(missing)} samples were never graded (first: {missing[0]})")
    return records, seconds


# --- the report (global rank 0) -----------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined value (the stderr of a single problem) is written as null."""
    return None if math.isnan(x) else x


def benchmark_summary(records: list[dict[str, Any]], k: int, pass_ks: tuple[int, ...]) -> dict[str, Any]:
    """avg@k and pass@j (unbiased) with standard errors over problems, status counts and response lengths."""
    out: dict[str, Any] = {"problems": len(records), "samples": len(records) * k}
    for j in pass_ks:
        s = summarize(records, j)
        if j == k:
            out[f"avg@{k}"], out[f"avg@{k}_stderr"] = s[f"avg@{k}"], _finite(s[f"avg@{k}_stderr"])
        out[f"pass@{j}"], out[f"pass@{j}_stderr"] = s[f"pass@{j}"], _finite(s[f"pass@{j}_stderr"])
    statuses = [st for r in records for st in r["statuses"]]
    out["statuses"] = {st: statuses.count(st) for st in STATUSES}
    tokens = [n for r in records for n in r["response_tokens"]]
    out["mean_response_tokens"] = sum(tokens) / len(tokens)
    out["truncated"] = sum(not f for r in records for f in r["finished"])  # cut off at max_new_tokens
    return out


def macro_average(per_benchmark: dict[str, dict[str, Any]], k: int, pass_ks: tuple[int, ...]) -> dict[str, Any]:
    """The unweighted mean over benchmarks; its standard error treats the benchmarks as independent."""
    n = len(per_benchmark)
    out: dict[str, Any] = {"benchmarks": n}
    for key in (f"avg@{k}", *(f"pass@{j}" for j in pass_ks)):
        out[key] = sum(s[key] for s in per_benchmark.values()) / n
        errs = [s[f"{key}_stderr"] for s in per_benchmark.values()]
        out[f"{key}_stderr"] = None if None in errs else math.sqrt(sum(e * e for e in errs)) / n
    return out


def _write_report(
    cfg: EvalRunConfig,
    benchmarks: list[Benchmark],
    results: dict[str, tuple[list[dict[str, Any]], dict[str, float]]],
    stops: tuple[int, ...],
    world: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    (out / "records").mkdir(parents=True, exist_ok=True)
    per_benchmark: dict[str, dict[str, Any]] = {}
    for bench in benchmarks:
        records, timing = results[bench.name]
        path = out / "records" / f"{bench.name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        per_benchmark[bench.name] = {
            "rule": bench.rule,
            **benchmark_summary(records, cfg.k, cfg.pass_ks),
            "records": str(path.relative_to(out)),
            "seconds": timing,
        }
    mp = cfg.parallel.tp * cfg.parallel.pp
    summary: dict[str, Any] = {
        "model": cfg.model,
        "rollout": cfg.rollout,
        "dtype": cfg.dtype,
        "k": cfg.k,
        "sampling": {
            "k": cfg.k,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
            "stop_token_ids": list(stops),
        },
        "prompt": asdict(cfg.prompt),
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": world // mp, "world": world},
        "benchmarks": per_benchmark,
        "macro": macro_average(per_benchmark, cfg.k, cfg.pass_ks),
        "seconds": seconds,
        "config": asdict(cfg),
    }
    if cfg.plot:
        summary["plot"] = str(plot_summary(summary, out / "avg_at_k.png").relative_to(out))
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    print(f"eval: wrote {out / 'summary.json'}", file=sys.stderr, flush=True)
    return summary


def plot_summary(summary: dict[str, Any], path: Path) -> Path:
    """avg@k per benchmark (bars) with standard-error bars over problems, and the macro average as a line."""
    plt = pyplot()
    k = summary["k"]
    names = list(summary["benchmarks"])
    means = [summary["benchmarks"][n][f"avg@{k}"] for n in names]
    errs = [summary["benchmarks"][n][f"avg@{k}_stderr"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4))
    ax.bar(names, means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(summary["macro"][f"avg@{k}"], color="k", linestyle="--", linewidth=1, label="macro average")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"avg@{k}")
    s = summary["sampling"]
    ax.set_title(f"{Path(summary['model']).name}: T={s['temperature']}, top-p={s['top_p']}, k={k}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_benchmarks_in_training(
    benchmarks: tuple[str, ...],
    *,
    model_dir: str | Path,
    engine: Any,
    tokenizer: Any,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    limit: int | None,
) -> dict[str, float]:
    """Periodic benchmark evaluation inside training (collective over the job): the student's current weights
    through the training run's own engine, the same prompts, grading and statistics as `topd eval`; `model_dir` is
    the student's HF-side directory (tokenizer, chat template, generation config). Returns flat
    metrics on global rank 0 (`bench/<name>/avg@k`, `.../pass@j`, their stderr, `.../no_answer`, and the macro
    average `bench/macro/...`), {} elsewhere."""
    import torch.distributed as dist

    cfg = EvalRunConfig(
        model=str(model_dir),
        benchmarks=benchmarks,
        k=k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        limit=limit,
    )
    stops = stop_token_ids(tokenizer, Path(model_dir))
    per_benchmark: dict[str, dict[str, Any]] = {}
    for bench in load_benchmarks(cfg):
        prompts = [_encode(tokenizer, render_prompt(cfg.prompt, tokenizer, p.problem)) for p in bench.problems]
        records, _ = _evaluate_benchmark(cfg, bench, prompts, engine, tokenizer, stops)
        if dist.get_rank() == 0:
            per_benchmark[bench.name] = benchmark_summary(records, k, cfg.pass_ks)
    if dist.get_rank() != 0:
        return {}
    metrics: dict[str, float] = {}
    groups = {**per_benchmark, "macro": macro_average(per_benchmark, k, cfg.pass_ks)}
    for name, summary in groups.items():
        for key, value in summary.items():
            if isinstance(value, (int, float)) and (key.startswith(("avg@", "pass@")) or key == "problems"):
                metrics[f"bench/{name}/{key}"] = float("nan") if value is None else float(value)
        for status, count in summary.get("statuses", {}).items():
            metrics[f"bench/{name}/{status}"] = float(count)
    return metrics
