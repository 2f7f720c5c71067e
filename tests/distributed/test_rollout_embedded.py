"""The embedded rollout engine (KV-cached decoding) samples from the Megatron model: greedy continuations and their
log-probs equal Hugging Face's (a full forward per token) for the same checkpoint, at TP=2 and PP=2, for prompts of
different lengths split over micro-batches; seeded sampling is reproducible."""

from __future__ import annotations

from pathlib import Path

import torch

from topd_megatron.distributed.launch import spawn

PROMPTS = [[3, 17, 42, 99], [120, 4], [44, 45, 46, 200, 201, 383, 5]]


def generate_body(rank: int, world: int, ckpt: str, tp: int, pp: int, temperature: float, seed: int):
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.embedded import EmbeddedEngine
    from topd_megatron.rollout.engine import SamplingParams

    par = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(par)
    lm = build_model(ModelConfig(path=ckpt, dtype="float32"), par)
    engine = EmbeddedEngine(lm, micro_batch_size=2)
    params = SamplingParams(temperature=temperature, max_new_tokens=6, stop_token_ids=(2,), seed=seed)
    return [(g.output_ids, g.output_logprobs, g.finished) for g in engine.generate(PROMPTS, params)]


def _hf_greedy(ckpt: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            nxt = int(logp.argmax())
            ids.append(nxt)
            lps.append(float(logp[nxt]))
            if nxt == 2:
                break
    return ids[len(prompt) :], lps


def test_greedy_generation_matches_hugging_face(tiny_checkpoints: dict[str, Path]) -> None:
    ckpt = str(tiny_checkpoints["qwen3"])
    expected = [_hf_greedy(ckpt, p, 6) for p in PROMPTS]
    for tp, pp in ((2, 1), (1, 2)):
        results = spawn(generate_body, tp * pp, (ckpt, tp, pp, 0.0, 0), timeout=600)
        assert all(r == results[0] for r in results), f"TP={tp} PP={pp}: ranks disagree"
        for (ids, lps, finished), (ref_ids, ref_lps) in zip(results[0], expected, strict=True):
            assert ids == ref_ids, f"TP={tp} PP={pp}: {ids} vs HF {ref_ids}"
            assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-4
            assert finished == (ids[-1] == 2)


def test_seeded_sampling_is_reproducible(tiny_checkpoints: dict[str, Path]) -> None:
    ckpt = str(tiny_checkpoints["llama"])
    a = spawn(generate_body, 2, (ckpt, 2, 1, 1.0, 7), timeout=600)[0]
    b = spawn(generate_body, 2, (ckpt, 2, 1, 1.0, 7), timeout=600)[0]
    c = spawn(generate_body, 2, (ckpt, 2, 1, 1.0, 8), timeout=600)[0]
    assert a == b
    assert [x[0] for x in a] != [x[0] for x in c], "a different seed should give different samples"
