"""The served-model self-test on a run's ranks (collective): the server-side checks of
`topd_megatron.rollout.sglang.selftest` on global rank 0, then the comparison with the colocated Megatron models.

    metrics = served_selftest(cfg.sglang.selftest, engine, prompts, expected={"student": dir, "teacher": dir},
                              colocated={"student": session.student, "teacher": session.teacher})

Raises `SelfTestError` on every rank (the same message) when a check fails; returns the metrics on every rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from topd_megatron.algorithm.loss import token_logprobs
from topd_megatron.models.build import MegatronLM
from topd_megatron.rollout.sglang.engine import SGLangEngine
from topd_megatron.rollout.sglang.selftest import (
    SelfTestConfig,
    SelfTestError,
    ServedModel,
    check_consistency,
    check_identity,
    gap,
)
from topd_megatron.training.forward import broadcast_from_last_stage, forward_logits, make_microbatch


def megatron_logprobs(lm: MegatronLM, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
    """log p(seq[i] | seq[:i]) for i >= start of each sequence under the Megatron model `lm` (collective over its
    model-parallel group: vocab-parallel log-probs on the last stage, broadcast to every stage)."""
    from megatron.core import parallel_state as ps

    length = max(map(len, sequences))
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(seq)
    group = ps.get_tensor_model_parallel_group()

    def reduce(mb: Any, logits: torch.Tensor) -> torch.Tensor:
        b, s, v = logits[:, :-1].shape
        flat = token_logprobs(
            logits[:, :-1].reshape(b * s, v), tokens[:, 1:].reshape(-1), vocab_size=lm.vocab_size, group=group
        )
        return flat.reshape(b, s).to(torch.float64)

    out = forward_logits(lm.modules, [make_microbatch(tokens)], reduce)
    lp = broadcast_from_last_stage(out[0] if out else None, (len(sequences), length - 1), torch.float64)
    return [lp[i, starts[i] - 1 : len(seq) - 1].tolist() for i, seq in enumerate(sequences)]


def _on_rank0(
    cfg: SelfTestConfig, engine: SGLangEngine, prompts: list[list[int]], expected: dict[str, Path]
) -> dict[str, Any]:
    """The server-side checks of every server (rank 0 only): {"metrics", "failures", "probes": {role: Probes}}."""
    metrics: dict[str, float] = {}
    failures: list[str] = []
    probes = {}
    for role in sorted(engine.endpoints):
        first, *others = engine.server_clients(role)  # every server of the role directly, not through its router
        model = ServedModel(
            role=role,
            client=first,
            expected_dir=expected[role],
            vocab_size=engine.vocab_sizes[role],
            dp=engine.server_cfgs[role].dp,
            others=tuple(others),
        )
        for one in (first, *others):
            found, problems = check_identity(dataclasses.replace(model, client=one, others=()))
            metrics |= found
            failures += [f"sglang.{role} ({one.url}): {p}" for p in problems]
        probes[role], more, inconsistent = check_consistency(cfg, model, prompts)
        metrics |= more
        failures += [f"sglang.{role} ({first.url}): {p}" for p in inconsistent]
    return {"metrics": metrics, "failures": failures, "probes": probes}


def served_selftest(
    cfg: SelfTestConfig,
    engine: SGLangEngine,
    prompts: list[list[int]],
    *,
    expected: dict[str, Path],
    colocated: dict[str, MegatronLM | None],
) -> dict[str, float]:
    """Run the self-test of every server of `engine` (collective). `expected`: the HF directory each role must
    serve; `colocated`: the Megatron model to compare each role's log-probs with (None: none here)."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [_on_rank0(cfg, engine, prompts[: cfg.probes], expected)]
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            box = [{"error": f"{type(e).__name__}: {e}"}]
    dist.broadcast_object_list(box, src=0)
    report = box[0]
    if "error" in report:
        raise SelfTestError(f"the served-model self-test could not run: {report['error']}")
    metrics, failures = report["metrics"], list(report["failures"])
    for role in sorted(report["probes"]):
        lm = colocated.get(role)
        if lm is None:
            continue
        probes = report["probes"][role]
        mine = megatron_logprobs(lm, probes.sequences, probes.starts)
        mean, worst = gap(probes.served, mine)
        metrics |= {f"{role}/selftest_colocated_mean": mean, f"{role}/selftest_colocated_max": worst}
        if mean > cfg.tolerance:
            failures.append(
                f"sglang.{role}: its log-probs differ from the colocated Megatron {role}'s by {mean:.4g} per token on"
                f" average (> tolerance {cfg.tolerance:g}; max {worst:.4g}): another model, or other weights"
            )
    if failures:
        raise SelfTestError(
            "the served-model self-test failed before step 1:\n  - " + "\n  - ".join(failures) + "\nServe the"
            " expected model (with SGLANG_RETURN_ORIGINAL_LOGPROB=1 for attached servers), or raise"
            " sglang.selftest.tolerance if the disagreement is expected (e.g. a bf16 server)."
        )
    return metrics
