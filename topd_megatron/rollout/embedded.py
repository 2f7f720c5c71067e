"""The embedded rollout engine: sample continuations in-process from the Megatron student or teacher.

Every step runs the unfinished sequences (right-padded, causal mask: a row's padding never influences its real
tokens) through Megatron's pipeline schedule without a KV cache, samples the next token on the last pipeline stage
from the vocab-sharded logits (`topd_megatron.rollout.sampling`), and broadcasts it to the other stages. Quadratic
in the sequence length: meant for tiny models and tests; use SGLang at scale.

All ranks of the model-parallel group must call `generate` with the same prompts and parameters (data-parallel
replicas pass their own prompts); every rank returns the same generations.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from topd_megatron.models.build import MegatronLM
from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.rollout.sampling import sample_next
from topd_megatron.seeds import embedded_generator_seed
from topd_megatron.training.forward import forward_logits, make_microbatch


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

    def _generate(self, lm: MegatronLM, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        pp_group = ps.get_pipeline_model_parallel_group()
        last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        gen = torch.Generator(device="cpu")
        # Noise differs across TP ranks (each samples its own vocabulary shard) and DP replicas, never across PP.
        gen.manual_seed(
            embedded_generator_seed(params.seed, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
        )
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        stop = set(params.stop_token_ids)
        for _ in range(params.max_new_tokens):
            if not active:
                break
            ids = torch.zeros(len(active), dtype=torch.long)
            logps = torch.zeros(len(active), dtype=torch.float32)
            width = max(len(seqs[i]) for i in active)
            for start in range(0, len(active), self.micro_batch_size):
                rows = active[start : start + self.micro_batch_size]
                tokens = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):
                    tokens[r, : len(seqs[i])] = torch.tensor(seqs[i])
                logits = forward_logits(lm.modules, [make_microbatch(tokens.to(device))])
                if last_stage:
                    last = torch.tensor([len(seqs[i]) - 1 for i in rows], device=device)
                    step_logits = logits[0][torch.arange(len(rows), device=device), last]
                    tok, lp = sample_next(
                        step_logits,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        generator=gen,
                        vocab_size=lm.vocab_size,
                        group=tp_group,
                    )
                    ids[start : start + len(rows)] = tok.cpu()
                    logps[start : start + len(rows)] = lp.float().cpu()
            if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
                payload = torch.stack([ids.double(), logps.double()]).to(device)
                dist.broadcast(payload, src=pp_last_rank, group=pp_group)  # the last stage decided the tokens
                ids, logps = payload[0].long().cpu(), payload[1].float().cpu()
            still = []
            for r, i in enumerate(active):
                t = int(ids[r])
                seqs[i].append(t)
                outs[i].append(t)
                lps[i].append(float(logps[r]))
                if t not in stop:
                    still.append(i)
            active = still
        finished_ids = set(range(len(prompts))) - set(active)
        return [
            Generation(prompt_ids=list(p), output_ids=outs[i], output_logprobs=lps[i], finished=i in finished_ids)
            for i, p in enumerate(prompts)
        ]
