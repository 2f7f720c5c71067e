"""Windows sampled per rollout (rollout/windows.py: each rollout prefilled once into the KV cache, its windows decoded
side by side after it) follow the distributions of one sequence per prefix: greedy windows and their log-probs equal
`EmbeddedEngine.generate` on the prefixes (float64, TP=2 and PP=2; rows with several windows, a padded row, rows split
over two caches), EOS ends a window early, and seeded sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from topd_megatron.distributed.launch import spawn

K = 4


def _rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    rows = torch.randint(3, vocab, (3, 10), generator=gen)
    rows[1, 7:] = 0  # a shorter rollout, right-padded
    s1 = rows.shape[1] - 1
    positions = torch.tensor([1, 4, 5, 8, s1 + 2, s1 + 6, 2 * s1 + 0, 2 * s1 + 3])  # several windows per row
    return rows, positions


def windows_body(rank: int, world: int, ckpt: str, tp: int, pp: int, temperature: float) -> dict:
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.embedded import EmbeddedEngine
    from topd_megatron.rollout.engine import SamplingParams

    torch.set_num_threads(1)
    par = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(par)
    lm = build_model(ModelConfig(path=ckpt, dtype="float64"), par)
    engine = EmbeddedEngine(lm, lm, micro_batch_size=2)
    rows, positions = _rows(lm.vocab_size)
    out = {}
    for stop in ((), None):
        if stop is None:  # stop at the token greedy decoding emits second in the first window: EOS handling
            stop = (out["packed", ()][0][0][1],)
        params = SamplingParams(temperature=temperature, max_new_tokens=K, stop_token_ids=stop, seed=3)
        s1 = rows.shape[1] - 1
        prefixes = [rows[int(p) // s1, : int(p) % s1 + 1].tolist() for p in positions]
        packed = engine.generate_windows(rows, positions, params, model="teacher")
        again = engine.generate_windows(rows, positions, params, model="teacher")
        plain = engine.generate(prefixes, params, model="teacher")
        key = tuple(stop)
        out["packed", key] = [(g.output_ids, g.output_logprobs, g.finished, g.prompt_ids) for g in packed]
        out["again", key] = [(g.output_ids, g.output_logprobs) for g in again]
        out["plain", key] = [(g.output_ids, g.output_logprobs, g.finished, g.prompt_ids) for g in plain]
    return out


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_packed_greedy_windows_equal_one_sequence_per_prefix(synthetic_pair, tp: int, pp: int) -> None:
    results = spawn(windows_body, tp * pp, (str(synthetic_pair[1]), tp, pp, 0.0), timeout=600)
    for r in results:
        for key in [k for k in r if k[0] == "packed"]:
            packed, plain = r[key], r["plain", key[1]]
            assert len(packed) == len(plain) == 8
            for (ids, lps, fin, pre), (ids2, lps2, fin2, pre2) in zip(packed, plain, strict=True):
                assert pre == pre2 and ids == ids2 and fin == fin2, (key, ids, ids2)
                assert max(abs(a - b) for a, b in zip(lps, lps2, strict=True)) < 1e-10
        stopped = r["packed", next(k[1] for k in r if k[0] == "packed" and k[1])]
        assert any(fin and len(ids) < K for ids, _, fin, _ in stopped)  # EOS ended some window early
        assert all(len(ids) == K for ids, *_ in r["packed", ()])


def test_packed_sampling_is_seeded(synthetic_pair) -> None:
    (r,) = spawn(windows_body, 1, (str(synthetic_pair[1]), 1, 1, 1.0), timeout=600)
    for key in [k for k in r if k[0] == "packed"]:
        assert [(ids, lps) for ids, lps, *_ in r[key]] == r["again", key[1]]
        assert len({tuple(ids) for ids, *_ in r[key]}) > 1  # real samples, not one repeated sequence
