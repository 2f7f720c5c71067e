"""`topd prepare`: make the tiny teacher and student for a task (cached by content hash).

    topd prepare                                  # the drift task, the tiny main job's pair
    topd prepare --task my_pkg.tasks:make_task --force

1. a word-level tokenizer over the task's vocabulary (`Task.tokenizer_corpus`);
2. SFT of a teacher (Qwen3 architecture, ~0.4M parameters) on the task's "teacher"-style traces until it is strong
   (>= `min_teacher_accuracy` on held-out problems);
3. SFT of a smaller student on "student"-style traces, so that it is clearly weaker (<= `max_student_accuracy`) and
   prefers other surface forms than the teacher;
4. the capacity-ceiling control: the same student architecture, SFT'd on the teacher's traces (how far the student's
   size lets it go when it is shown the teacher's solutions directly);
5. all saved as Hugging Face checkpoints (config + safetensors + tokenizer) with a report.json (accuracy at the
   evaluation temperature and greedy, on held-out problems).

The SFT is plain PyTorch on the Hugging Face model, one model per worker process (`workers`, one core each); TOPD
itself then loads the checkpoints into Megatron-Core. The result lives in `<cache>/prepared/<hash>/`, where the hash
covers this Config, the task (its class and fields) and PREPARE_VERSION; a finished preparation is reused as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from topd_megatron.models.tiny import TinyModelSpec, cache_root, hf_config_for, make_word_tokenizer
from topd_megatron.models.tokenizer import encode_example, encode_prompt
from topd_megatron.tasks import Problem, Task, load_task

PREPARE_VERSION = 2
"""Bump when the preparation procedure changes: it invalidates every cached preparation."""


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    """Supervised fine-tuning of one tiny model."""

    spec: TinyModelSpec
    style: str
    """Trace style of the task (its `sft_traces(style=...)`)."""
    steps: int
    lr: float
    batch_size: int = 64
    seed: int = 0


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """What to prepare; every field enters the cache key."""

    task: str = "topd_megatron.tasks.drift:default"
    """The task, as `module:attr`."""
    teacher: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            spec=TinyModelSpec(family="qwen3", hidden_size=96, num_layers=4, intermediate_size=256, seed=1),
            style="teacher",
            steps=900,
            lr=4e-3,
        )
    )
    student: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            spec=TinyModelSpec(family="qwen3", hidden_size=64, num_layers=2, intermediate_size=128, seed=2),
            style="student",
            steps=800,
            lr=3e-3,
        )
    )
    ceiling: SFTConfig | None = field(
        default_factory=lambda: SFTConfig(
            spec=TinyModelSpec(family="qwen3", hidden_size=64, num_layers=2, intermediate_size=128, seed=2),
            style="teacher",
            steps=800,
            lr=3e-3,
        )
    )
    """The capacity-ceiling control (the student's architecture on the teacher's traces); None: not made."""
    train_problems: int = 20_000
    """SFT problems (traces are drawn from the task's training split)."""
    eval_problems: int = 200
    """Held-out problems for the accuracy checks."""
    eval_temperature: float = 1.0
    """Sampling temperature of the accuracy checks (greedy accuracy is reported too)."""
    eval_k: int = 2
    """Samples per held-out problem in the accuracy checks (avg@k)."""
    max_new_tokens: int = 64
    min_teacher_accuracy: float = 0.9
    """The teacher's avg@k at eval_temperature must reach this."""
    max_student_accuracy: float = 0.60
    """The student's avg@k at eval_temperature must stay at or below this (room for distillation to show)."""
    vocab_multiple: int = 64
    """The HF vocab_size is the tokenizer length rounded up to this (divisible by the TP sizes used)."""
    threads: int = 0
    """torch threads per SFT worker (0: the machine's cores divided by `workers`)."""
    workers: int = 2
    """SFT processes running side by side (the three models train in parallel)."""


@dataclass(kw_only=True, slots=True)
class Prepared:
    """Where a preparation lives and what it measured."""

    root: Path
    teacher_dir: Path
    student_dir: Path
    report: dict[str, Any]

    @property
    def ceiling_dir(self) -> Path | None:
        """The capacity-ceiling control's checkpoint, when the preparation made one."""
        path = self.root / "ceiling"
        return path if path.is_dir() else None


def cache_key(cfg: PrepareConfig, task: Task) -> str:
    blob = json.dumps(
        {
            "cfg": asdict(cfg),
            "task": f"{type(task).__module__}.{type(task).__qualname__}",
            "task_repr": repr(task),
            "version": PREPARE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft(
    cfg: SFTConfig,
    tokenizer: Any,
    task: Task,
    problems: list[Problem],
    out_dir: Path,
    vocab_size: int,
    label: str,
    *,
    progress: bool = True,
) -> Path:
    """Train a fresh model of `cfg.spec` on `problems` with the task's `cfg.style` traces; save it to `out_dir`."""
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM

    config = hf_config_for(cfg.spec, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        traces = task.sft_traces(problems, cfg.style, cfg.seed)
        data = [encode_example(tokenizer, p.prompt, t) for p, t in zip(problems, traces, strict=True)]
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
        rng = random.Random(cfg.seed)
        model.train()
        with Progress(transient=True, disable=not progress) as bars:
            bar = bars.add_task(f"SFT {label}", total=cfg.steps)
            for _ in range(cfg.steps):
                batch = rng.sample(data, cfg.batch_size)
                width = max(len(ids) for ids, _ in batch)
                ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                for i, (seq, n_prompt) in enumerate(batch):
                    ids[i, : len(seq)] = torch.tensor(seq)
                    labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])  # loss on the response only
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                bars.update(bar, advance=1, description=f"SFT {label} loss {loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@torch.no_grad()
def hf_accuracy(
    model_dir: Path,
    tokenizer: Any,
    task: Task,
    problems: list[Problem],
    *,
    max_new_tokens: int,
    temperature: float,
    k: int,
    seed: int = 0,
) -> tuple[float, list[str]]:
    """avg@k of an HF checkpoint on `problems`: k samples per problem at `temperature` (0: greedy, k ignored),
    left-padded batched generation with a fixed seed. Returns (accuracy, completions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    k = 1 if temperature == 0 else k
    todo = [p for p in problems for _ in range(k)]
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(todo), 64):
            chunk = todo[start : start + 64]
            prompts = [encode_prompt(tokenizer, p.prompt) for p in chunk]
            width = max(map(len, prompts))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                att[i, width - len(p) :] = 1
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts += [tokenizer.decode(out[i, width:], skip_special_tokens=True) for i in range(len(chunk))]
    correct = sum(task.is_correct(t, p) for t, p in zip(texts, todo, strict=True))
    return correct / len(todo), texts


def prepared_paths(cfg: PrepareConfig | None = None, *, root: Path | None = None) -> tuple[Path, Path]:
    """(student_dir, teacher_dir) where `prepare(cfg)` puts (or has put) the pair; prepares nothing."""
    cfg = cfg or PrepareConfig()
    base = (root or cache_root() / "prepared") / cache_key(cfg, load_task(cfg.task))
    return base / "student", base / "teacher"


def prepare(cfg: PrepareConfig | None = None, *, force: bool = False, root: Path | None = None) -> Prepared:
    """Prepare (or reuse) the teacher/student pair of `cfg`. Raises RuntimeError when an accuracy check fails."""
    cfg = cfg or PrepareConfig()
    task = load_task(cfg.task)
    key = cache_key(cfg, task)
    base = (root or cache_root() / "prepared") / key
    report_path = base / "report.json"
    if report_path.is_file() and not force:
        return Prepared(
            root=base,
            teacher_dir=base / "teacher",
            student_dir=base / "student",
            report=json.loads(report_path.read_text()),
        )
    base.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[topd] preparing the tiny pair for {cfg.task} (SFT of the teacher, the student and the capacity-ceiling"
        f" control; cached in {base})",
        flush=True,
    )
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(dir=base.parent, prefix=f".{key}-") as tmp:
            report = _prepare_into(cfg, task, Path(tmp))
            report["cache_key"] = key
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            if base.exists():
                shutil.rmtree(base)
            Path(tmp).rename(base)
            Path(tmp).mkdir()  # TemporaryDirectory cleans up a directory of that name
    finally:
        torch.set_num_threads(threads)
    return Prepared(root=base, teacher_dir=base / "teacher", student_dir=base / "student", report=report)


@dataclass(kw_only=True, slots=True)
class _Job:
    """One model of a preparation, trained and checked in a worker process."""

    role: str
    sft: SFTConfig
    cfg: PrepareConfig
    tokenizer_dir: Path
    vocab_size: int
    out: Path
    threads: int


def _train_and_check(job: _Job) -> dict[str, Any]:
    """Worker: SFT one model, then its held-out accuracy at the evaluation temperature and greedy."""
    from transformers import AutoTokenizer

    torch.set_num_threads(job.threads)
    start = time.perf_counter()
    cfg, task = job.cfg, load_task(job.cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(str(job.tokenizer_dir), local_files_only=True)
    train = task.train_problems(cfg.train_problems, seed=0)
    held_out = task.eval_problems(cfg.eval_problems, seed=0)
    model_dir = sft(job.sft, tokenizer, task, train, job.out / job.role, job.vocab_size, job.role, progress=False)
    check = {"max_new_tokens": cfg.max_new_tokens}
    acc, texts = hf_accuracy(
        model_dir, tokenizer, task, held_out, temperature=cfg.eval_temperature, k=cfg.eval_k, **check
    )
    greedy, _ = hf_accuracy(model_dir, tokenizer, task, held_out, temperature=0.0, k=1, **check)
    return {
        "accuracy": acc,
        "greedy_accuracy": greedy,
        "eval_temperature": cfg.eval_temperature,
        "eval_k": cfg.eval_k,
        "eval_problems": len(held_out),
        "params": _count_params(model_dir),
        "style": job.sft.style,
        "sft_steps": job.sft.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "samples": texts[:3],
    }


def _prepare_into(cfg: PrepareConfig, task: Task, out: Path) -> dict[str, Any]:
    import concurrent.futures
    import multiprocessing
    import os

    from rich.progress import Progress
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok_dir = make_word_tokenizer(out / "tokenizer", task.tokenizer_corpus())
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    vocab_size = -(-len(tokenizer) // cfg.vocab_multiple) * cfg.vocab_multiple
    report: dict[str, Any] = {
        "task": cfg.task,
        "task_repr": repr(task),
        "vocab_size": vocab_size,
        "tokenizer_length": len(tokenizer),
    }
    report["max_new_tokens"] = _generation_budget(cfg, task, tokenizer)
    cfg = dataclasses.replace(cfg, max_new_tokens=report["max_new_tokens"])
    roles = [("teacher", cfg.teacher), ("student", cfg.student)] + ([("ceiling", cfg.ceiling)] if cfg.ceiling else [])
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    jobs = [
        _Job(role=r, sft=c, cfg=cfg, tokenizer_dir=tok_dir, vocab_size=vocab_size, out=out, threads=threads)
        for r, c in roles
    ]
    spawn = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=spawn) as pool,
        Progress(transient=True) as bars,
    ):
        bar = bars.add_task(f"SFT of {', '.join(r for r, _ in roles)}", total=len(jobs))
        futures = {pool.submit(_train_and_check, job): job.role for job in jobs}
        for done in concurrent.futures.as_completed(futures):
            role = futures[done]
            report[role] = done.result()
            r = report[role]
            bars.update(bar, advance=1)
            print(
                f"[topd] {role}: {r['params']} parameters, {r['sft_steps']} SFT steps on {r['style']} traces,"
                f" held-out accuracy {r['accuracy']:.3f} (avg@{cfg.eval_k}, T={cfg.eval_temperature}), greedy"
                f" {r['greedy_accuracy']:.3f}, in {r['seconds']:.0f} s",
                flush=True,
            )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _check_pair(cfg, report)
    return report


def _generation_budget(cfg: PrepareConfig, task: Task, tokenizer: Any) -> int:
    """New tokens a completion may need: `max_new_tokens`, raised to the task's longest trace (teacher and student
    styles, 500 training problems) plus 16 tokens of slack, so that no task's answers are cut off."""
    problems = task.train_problems(500, seed=0)
    longest = 0
    for style in ("teacher", "student"):
        for p, trace in zip(problems, task.sft_traces(problems, style, seed=0), strict=True):
            ids, n_prompt = encode_example(tokenizer, p.prompt, trace)
            longest = max(longest, len(ids) - n_prompt)
    return max(cfg.max_new_tokens, longest + 16)


def _check_pair(cfg: PrepareConfig, report: dict[str, Any]) -> None:
    """Refuse a pair that cannot show distillation (a teacher no better than its student); warn where the pair
    misses the intended margins (a teacher below `min_teacher_accuracy`, a student above `max_student_accuracy`) but
    still leaves room to distil: a task of another family then runs, and the references in its results say how far
    apart the two models are."""
    teacher, student = report["teacher"]["accuracy"], report["student"]["accuracy"]
    if teacher <= student:
        raise RuntimeError(
            f"preparation did not produce a pair to distil: the teacher's held-out accuracy {teacher:.3f} is not"
            f" above the student's {student:.3f}; raise teacher.steps or the teacher's size, or lower student.steps"
        )
    if teacher < cfg.min_teacher_accuracy:
        print(f"[topd] warning: teacher accuracy {teacher:.3f} < {cfg.min_teacher_accuracy} (intended)", flush=True)
    if student > cfg.max_student_accuracy:
        print(f"[topd] warning: student accuracy {student:.3f} > {cfg.max_student_accuracy} (intended)", flush=True)


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            n = 1
            for dim in f.get_slice(name).get_shape():
                n *= dim
            total += n
    return total
