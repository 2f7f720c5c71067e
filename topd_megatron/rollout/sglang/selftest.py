"""The served-model self-test, run before step 1: is the model behind each SGLang URL the one this run expects, and
do its log-probs mean what the objective assumes?

For every server of the run (the teacher's, and the student's, whose log-probs enter the importance ratios):

- identity through the server's own metadata (`/model_info`): its architecture and model type are the expected
  model's; when the directory it serves is readable here (one machine, or a shared filesystem), its config (vocabulary
  size, EOS id, width, depth, heads) and tokenizer files (`check_same_tokenizer`) are the expected model's too; and a
  probe holding the expected vocabulary's last id is scored (a smaller vocabulary fails it);
- a fixed probe batch (the run's first training prompts, continued greedily by the server) is scored twice: the
  served log-probs must agree between calls, and between every data-parallel replica (`routed_dp_rank`);
- temperature-1 semantics: tokens sampled at `temperature` != 1 are reported with the log-probs that scoring them
  gives (the model's own distribution), not with tempered ones (SGLang returns tempered log-probs unless its
  process has SGLANG_RETURN_ORIGINAL_LOGPROB=1, which servers launched by topd have; an attached one may not);
- against the colocated Megatron model when there is one (the student always; the teacher with
  teacher_source=megatron), whose vocab-parallel log-probs of the same tokens are computed on the run's ranks.

Each comparison is a mean and a max |delta log p| per probe token, logged as `{role}/selftest_{check}_{mean,max}`
(split "selftest" of the metrics, at the step the run starts from). A mean above `tolerance` or an identity
mismatch aborts the run with one error listing every failed check, before any rollout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from topd_megatron.models.tokenizer import check_same_tokenizer
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient

IDENTITY_FIELDS = ("vocab_size", "eos_token_id", "hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass(kw_only=True, slots=True)
class SelfTestConfig:
    """The served-model self-test before step 1 (`topd_megatron.rollout.sglang.selftest`)."""

    enabled: bool = True
    probes: int = 4
    """Probe sequences: the run's first training prompts."""
    probe_tokens: int = 16
    """Tokens the server generates greedily after each probe prompt (the scored positions)."""
    temperature: float = 0.7
    """Sampling temperature of the temperature-1 check (must differ from 1)."""
    tolerance: float = 0.02
    """Largest mean |delta log p| per probe token (nats) allowed in each comparison. Above it the run aborts. Float32
    servers on CPU agree to ~1e-5; bf16 GPU servers to ~1e-2 between batch shapes; a wrong model or tempered
    log-probs differ by 0.1-1 and more."""

    def __post_init__(self) -> None:
        if self.probes < 1 or self.probe_tokens < 2:
            raise ValueError("sglang.selftest.probes must be >= 1 and probe_tokens >= 2")
        if not 0.0 < self.temperature != 1.0:
            raise ValueError(f"sglang.selftest.temperature must be > 0 and != 1, got {self.temperature}")
        if self.tolerance <= 0:
            raise ValueError(f"sglang.selftest.tolerance must be > 0, got {self.tolerance}")


class SelfTestError(RuntimeError):
    """A served model is not the expected one, or does not score consistently."""


@dataclass(kw_only=True, slots=True)
class ServedModel:
    """One server under test, as rank 0 sees it."""

    role: str
    client: SGLangClient
    expected_dir: Path
    """The HF directory of the model it must serve."""
    vocab_size: int
    dp: int
    """Data-parallel replicas behind the URL (each is checked)."""
    others: tuple[SGLangClient, ...] = ()
    """The role's other servers (behind its router): each scores the probe batch too, compared with this one."""


@dataclass(kw_only=True, slots=True)
class Probes:
    """The probe batch of one server and what it served for it."""

    sequences: list[list[int]]
    starts: list[int]
    served: list[list[float]]


def gap(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(mean, max) of |a - b| over every token of every sequence."""
    x = torch.tensor([v for row in a for v in row], dtype=torch.float64)
    y = torch.tensor([v for row in b for v in row], dtype=torch.float64)
    if x.shape != y.shape:
        raise SelfTestError(f"the probe batch was scored with {x.numel()} and {y.numel()} log-probs")
    d = (x - y).abs()
    return d.mean().item(), d.max().item()


def check_identity(model: ServedModel) -> tuple[dict[str, float], list[str]]:
    """The server's metadata against the expected model's files: (metrics, failures)."""
    info = model.client.model_info()
    want = json.loads((model.expected_dir / "config.json").read_text())
    failures = []
    for key in ("architectures", "model_type"):
        if info.get(key) is not None and info.get(key) != want.get(key):
            failures.append(f"it serves {key}={info.get(key)}, the expected model has {want.get(key)}")
    served_dir = Path(str(info.get("model_path") or ""))
    files = (served_dir / "config.json").is_file()
    if files:
        got = json.loads((served_dir / "config.json").read_text())
        failures += [
            f"its config has {key}={got.get(key)}, the expected model's {want.get(key)}"
            for key in IDENTITY_FIELDS
            if got.get(key) != want.get(key)
        ]
        if (served_dir / "tokenizer_config.json").is_file():
            try:
                check_same_tokenizer(model.expected_dir, served_dir)
            except ValueError as e:
                failures.append(f"its tokenizer differs: {e}")
    return {f"{model.role}/selftest_files_checked": float(files)}, failures


def _score(model: ServedModel, probes: Probes, dp_rank: int | None = None) -> list[list[float]]:
    scores = model.client.score(probes.sequences, probes.starts, vocab_size=model.vocab_size, dp_rank=dp_rank)
    return [s.logprobs for s in scores]


def check_consistency(
    cfg: SelfTestConfig, model: ServedModel, prompts: list[list[int]]
) -> tuple[Probes, dict[str, float], list[str]]:
    """Generate the probe batch on the server, score it repeatedly, on every replica, and check temperature-1
    semantics: (the probes with the first scoring, metrics, failures)."""
    role, failures, metrics = model.role, [], {}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.probe_tokens)
    gens = model.client.generate(prompts, greedy)
    probes = Probes(
        sequences=[g.prompt_ids + g.output_ids for g in gens], starts=[len(g.prompt_ids) for g in gens], served=[]
    )
    probes.served = _score(model, probes)
    comparisons = {"repeat": _score(model, probes)}
    for r in range(1, model.dp):
        comparisons[f"replica{r}"] = _score(model, probes, dp_rank=r)
    for i, other in enumerate(model.others, start=1):
        comparisons[f"server{i}"] = _score(dataclasses.replace(model, client=other, others=()), probes)
    tempered = model.client.generate(prompts, SamplingParams(temperature=cfg.temperature, max_new_tokens=8, seed=1))
    sampled = Probes(
        sequences=[g.prompt_ids + g.output_ids for g in tempered],
        starts=[len(g.prompt_ids) for g in tempered],
        served=[],
    )
    temperature = ([g.output_logprobs for g in tempered], _score(model, sampled))
    for name, (a, b) in {**{k: (probes.served, v) for k, v in comparisons.items()}, "temperature": temperature}.items():
        mean, worst = gap(a, b)
        metrics |= {f"{role}/selftest_{name}_mean": mean, f"{role}/selftest_{name}_max": worst}
        if mean > cfg.tolerance:
            failures.append(f"{name}: mean |delta log p| {mean:.4g} > tolerance {cfg.tolerance:g} (max {worst:.4g})")
    try:  # the expected vocabulary's last id must be a token the server knows
        last = Probes(sequences=[probes.sequences[0][:2] + [model.vocab_size - 1]], starts=[2], served=[])
        _score(model, last)
    except Exception as e:  # noqa: BLE001 - any failure here means the vocabulary is not the expected one
        failures.append(f"it cannot score token id {model.vocab_size - 1} of the expected vocabulary ({e})")
    return probes, metrics, failures
