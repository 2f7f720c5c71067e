"""The embedded rollout engine: sample continuations in-process from the Megatron student or teacher.

Prompts are decoded in chunks of `micro_batch_size` with Megatron-Core's static KV cache (StaticInferenceContext):
one prefill of the left-padded prompts, then one position of every row per forward through Megatron's pipeline
schedule;
the next token is sampled on the last pipeline stage from the vocab-sharded logits (`topd_megatron.rollout.sampling`)
and broadcast to the other stages. Meant for tiny models and tests; use SGLang at scale.

Windows after prefixes of a step's rollout rows (`generate_windows`, the WindowSampler protocol) decode per rollout:
each row is prefilled once and its windows continue side by side in its cache (rollout/windows.py).

All ranks of the model-parallel group must call `generate` with the same prompts and parameters (data-parallel
replicas pass their own prompts); every rank returns the same generations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from topd_megatron.models.build import MegatronLM
from topd_megatron.rollout.engine import Generation, Role, SamplingParams
from topd_megatron.rollout.windows import cache_chunk, next_tokens, sample_windows_packed
from topd_megatron.seeds import embedded_generator_seed
from topd_megatron.training.forward import MicroBatch, causal_mask


class EmbeddedEngine:
    """Samples from the in-process Megatron models; `sync_weights` is free (the student is the trained model)."""

    def __init__(self, student: MegatronLM, teacher: MegatronLM | None = None, *, micro_batch_size: int = 64) -> None:
        self.models = {"student": student, "teacher": teacher}
        self.micro_batch_size = micro_batch_size

    def sync_weights(self) -> dict[str, float]:
        return {"sync/seconds": 0.0, "sync/bytes": 0.0}

    def close(self) -> None:
        pass

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: Literal["student", "teacher"] = "student"
    ) -> list[Generation]:
        lm = self.models[model]
        if lm is None:
            raise ValueError(f"EmbeddedEngine: no {model} model was given")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("EmbeddedEngine.generate: empty prompt")
        if not prompts:  # every rank of the model-parallel group has none: nothing to run together
            return []
        was_training = [m.training for m in lm.modules]
        for m in lm.modules:
            m.eval()
        try:
            return self._generate(lm, prompts, params)
        finally:
            for m, mode in zip(lm.modules, was_training, strict=True):
                m.train(mode)

    def generate_windows(
        self, rows: Tensor, positions: Tensor, params: SamplingParams, *, model: Role
    ) -> list[Generation]:
        """Windows after prefixes of `rows`, each rollout row prefilled once into the KV cache for all its windows
        (rollout/windows.py)."""
        lm = self.models[model]
        if lm is None:
            raise ValueError(f"EmbeddedEngine: no {model} model was given")
        was_training = [m.training for m in lm.modules]
        for m in lm.modules:
            m.eval()
        try:
            return sample_windows_packed(lm, rows, positions, params, micro_batch_size=self.micro_batch_size)
        finally:
            for m, mode in zip(lm.modules, was_training, strict=True):
                m.train(mode)

    def _generate(self, lm: MegatronLM, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from megatron.core import parallel_state as ps

        gen = torch.Generator(device="cpu")
        gen.manual_seed(
            embedded_generator_seed(params.seed, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
        )
        out: list[Generation] = []
        for start in range(0, len(prompts), self.micro_batch_size):
            out += _Decoder(lm, prompts[start : start + self.micro_batch_size], params, gen).run()
        return out


@dataclass(slots=True)
class _Decoder:
    """KV-cached decoding of one chunk of prompts.

    The prompts are left-padded to a common length P and prefilled in one forward; then every row advances one
    position per forward. Padding is masked as a key (a padding position attends only to itself, so it stays
    finite), and rotary attention depends only on relative positions, so each row's logits are those of its own
    unpadded sequence.
    """

    lm: MegatronLM
    prompts: list[list[int]]
    params: SamplingParams
    gen: torch.Generator
    outs: list[list[int]] = field(init=False)
    lps: list[list[float]] = field(init=False)
    done: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.outs = [[] for _ in self.prompts]
        self.lps = [[] for _ in self.prompts]
        self.done = [False for _ in self.prompts]

    def run(self) -> list[Generation]:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        b, width = len(self.prompts), max(len(p) for p in self.prompts)
        total = width + self.params.max_new_tokens
        tokens = torch.zeros(b, total, dtype=torch.long)
        pad = torch.zeros(b, total, dtype=torch.bool)
        for i, p in enumerate(self.prompts):
            tokens[i, width - len(p) : width] = torch.tensor(p)
            pad[i, : width - len(p)] = True
        tokens, pad = tokens.to(device), pad.to(device)
        positions = torch.arange(total, device=device).unsqueeze(0).expand_as(tokens)
        eye = torch.eye(total, dtype=torch.bool, device=device)
        mask = (causal_mask(total, device) | (pad[:, None, None, :] & ~eye)).contiguous()  # [b, 1, total, total]
        cache = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
        start, end = 0, width
        while True:
            chunk = cache_chunk(tokens, positions, mask, cache, start, end)
            ids, logps = self._sample(chunk)
            cache.increment_sequence_len_offset(end - start)
            self._advance(tokens, end, ids, logps)
            if all(self.done):
                break
            start, end = end, end + 1
        return [
            Generation(prompt_ids=list(p), output_ids=o, output_logprobs=lp, finished=self._stopped(o))
            for p, o, lp in zip(self.prompts, self.outs, self.lps, strict=True)
        ]

    def _sample(self, chunk: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of every row and its log-prob (sampled on the last stage, broadcast over the pipeline)."""
        return next_tokens(self.lm, chunk, lambda logits: logits[:, -1], len(self.prompts), self.params, self.gen)

    def _advance(self, tokens: torch.Tensor, pos: int, ids: torch.Tensor, logps: torch.Tensor) -> None:
        """Write position `pos` of every row: its new sampled token, or padding once it is done."""
        for r in range(len(self.prompts)):
            if self.done[r]:
                tokens[r, pos] = 0
                continue
            t = int(ids[r])
            tokens[r, pos] = t
            self.outs[r].append(t)
            self.lps[r].append(float(logps[r]))
            self.done[r] = self._stopped(self.outs[r]) or len(self.outs[r]) >= self.params.max_new_tokens

    def _stopped(self, out: list[int]) -> bool:
        return bool(out) and out[-1] in self.params.stop_token_ids
