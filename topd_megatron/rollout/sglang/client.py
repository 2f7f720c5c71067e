"""HTTP client of one SGLang server: batched generation from token ids with per-token log-probs, teacher-forced
log-probs of given tokens (and top-k), weight-update endpoints. Retries transient failures with a bounded budget.

Responses are checked: a missing field, a wrong count of outputs or log-probs, or a short sequence raises
`SGLangResponseError` naming the request and what was wrong, never a silent truncation.
"""

from __future__ import annotations

import time
from typing import Any

from topd_megatron.rollout.engine import Generation, SamplingParams, TokenScores


class SGLangResponseError(RuntimeError):
    """The server answered, but not with what was asked (malformed, short, or an error status)."""


class SGLangUnavailable(RuntimeError):
    """The server could not be reached within the retry budget (it may have died: restart and resync)."""


def _cache_counts(meta: dict[str, Any]) -> dict[str, int]:
    """SGLang's own per-request counts: prompt tokens, and how many of them came from its radix (prefix) cache."""
    return {"prompt_tokens": int(meta.get("prompt_tokens") or 0), "cached_tokens": int(meta.get("cached_tokens") or 0)}


class SGLangClient:
    """Talks to one server. Not thread-safe per request body; safe to share across threads otherwise."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0, max_retries: int = 5) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # -- transport ---------------------------------------------------------------------------------------------
    def post(self, path: str, payload: dict[str, Any], *, retry: bool = True) -> Any:
        """POST JSON and return the decoded answer. Connection errors, timeouts and 5xx are retried (exponential
        backoff from 0.5 s) up to `max_retries` times; 4xx and `success: false` answers raise at once."""
        import requests

        attempts = 1 + (self.max_retries if retry else 0)
        last = ""
        for attempt in range(attempts):
            try:
                r = self.session.post(f"{self.url}{path}", json=payload, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 500:
                    return self._decode(path, r)
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            if attempt + 1 < attempts:
                time.sleep(min(0.5 * 2**attempt, 8.0))
        raise SGLangUnavailable(f"{self.url}{path} failed after {attempts} attempt(s): {last}")

    def get(self, path: str) -> Any:
        import requests

        try:
            r = self.session.get(f"{self.url}{path}", timeout=30)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise SGLangUnavailable(f"{self.url}{path}: {type(e).__name__}: {e}") from e
        return self._decode(path, r)

    def _decode(self, path: str, r: Any) -> Any:
        if r.status_code != 200:
            raise SGLangResponseError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:500]}")
        try:
            body = r.json()
        except ValueError as e:
            raise SGLangResponseError(f"{self.url}{path}: answer is not JSON: {r.text[:200]!r}") from e
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangResponseError(f"{self.url}{path}: {body.get('message', body)}")
        return body

    def healthy(self) -> bool:
        import requests

        try:
            return self.session.get(f"{self.url}/health_generate", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, seeds: list[int] | None = None, top_k: int = 0
    ) -> list[Generation]:
        """One continuation per prompt, with log pi(y_t | ...) of each output token (temperature 1: the server runs
        with SGLANG_RETURN_ORIGINAL_LOGPROB=1) and, when top_k > 0, the k most likely ids and their log-probs at each
        output position (computed by the decode that sampled the token: no second prefill). Stop tokens are kept in
        the output, as the embedded engine does."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("SGLangClient.generate: empty prompt")
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
            "no_stop_trim": True,
            "skip_special_tokens": False,
        }
        payload: dict[str, Any] = {
            "input_ids": prompts,
            # one prompt: one object (what sglang-router's schema takes); several: one object per prompt
            "sampling_params": (
                [dict(sampling, sampling_seed=s) for s in seeds]
                if len(seeds or ()) > 1
                else dict(sampling, sampling_seed=seeds[0])
                if seeds
                else sampling
            ),
            "return_logprob": True,
            "logprob_start_len": -1,
        }
        if top_k:
            payload["top_logprobs_num"] = top_k
        body = self.post("/generate", payload)
        outs = self._as_list(body, len(prompts), "/generate")
        gens = []
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            ids = out.get("output_ids")
            meta = out.get("meta_info") or {}
            lps = meta.get("output_token_logprobs")
            if ids is None or lps is None:
                raise SGLangResponseError(f"/generate output {i} lacks output_ids or meta_info.output_token_logprobs")
            if len(lps) != len(ids) or any(int(t) != int(lp[1]) for t, lp in zip(ids, lps, strict=True)):
                raise SGLangResponseError(
                    f"/generate output {i}: {len(ids)} tokens but {len(lps)} log-probs, or their token ids differ"
                )
            if not ids:
                raise SGLangResponseError(f"/generate output {i} is empty (max_new_tokens={params.max_new_tokens})")
            reason = (meta.get("finish_reason") or {}).get("type")
            finished = reason == "stop" or (bool(ids) and int(ids[-1]) in params.stop_token_ids)
            gen = Generation(
                prompt_ids=list(prompt),
                output_ids=[int(t) for t in ids],
                output_logprobs=[float(lp[0]) for lp in lps],
                finished=finished,
                meta={"finish_reason": reason, **_cache_counts(meta)},
            )
            if top_k:
                tops = meta.get("output_top_logprobs")
                if tops is None or len(tops) != len(ids) or any(t is None or len(t) < top_k for t in tops):
                    raise SGLangResponseError(f"/generate output {i} has no top-{top_k} log-probs for every token")
                gen.output_top_ids = [[int(x[1]) for x in t[:top_k]] for t in tops]
                gen.output_top_logprobs = [[float(x[0]) for x in t[:top_k]] for t in tops]
            gens.append(gen)
        return gens

    def score(
        self,
        sequences: list[list[int]],
        start: list[int],
        *,
        top_k: int = 0,
        vocab_size: int | None = None,
        dp_rank: int | None = None,
    ) -> list[TokenScores]:
        """Teacher forcing: log p(tokens[i] | tokens[:i]) for i >= start[j] of each sequence j (and the top-k tokens
        and log-probs at those positions when top_k > 0). One prefill per sequence, no sampling. `dp_rank` sends the
        request to that data-parallel replica of the server (default: SGLang's load balancing).

        Each reported token id is checked against the sequence. SGLang 0.5.23 reports the model's last vocabulary id
        (vocab_size - 1) as 0 in input log-probs (a clip meant for multimodal placeholder ids; the log-prob itself is
        the right token's): given the served model's `vocab_size`, that one id is accepted as 0."""
        if len(start) != len(sequences):
            raise ValueError(f"score: {len(sequences)} sequences but {len(start)} start positions")
        for j, (seq, s) in enumerate(zip(sequences, start, strict=True)):
            if not 1 <= s < len(seq):
                raise ValueError(f"score: sequence {j} has {len(seq)} tokens, start {s} must be in [1, {len(seq)})")
        payload: dict[str, Any] = {
            "input_ids": sequences,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            # SGLang scores tokens after logprob_start_len (the token at it gets None): start one earlier.
            "logprob_start_len": [s - 1 for s in start] if len(start) > 1 else start[0] - 1,
            "top_logprobs_num": top_k,
        }
        if dp_rank is not None:
            payload["routed_dp_rank"] = dp_rank
        clipped = vocab_size - 1 if vocab_size else None

        def same(reported: int, expected: int) -> bool:
            return reported == expected or (expected == clipped and reported == 0)

        outs = self._as_list(self.post("/generate", payload), len(sequences), "/generate (score)")
        result = []
        for j, (seq, s, out) in enumerate(zip(sequences, start, outs, strict=True)):
            meta = out.get("meta_info") or {}
            lps = meta.get("input_token_logprobs")
            want = len(seq) - s
            if lps is None:
                raise SGLangResponseError(f"score: output {j} lacks meta_info.input_token_logprobs")
            lps = lps[1:]  # the token at logprob_start_len = start - 1, reported without a log-prob
            if len(lps) != want:
                raise SGLangResponseError(f"score: output {j} has {len(lps)} input log-probs for {want} tokens")
            bad = next((i for i, lp in enumerate(lps) if lp[0] is None or not same(int(lp[1]), seq[s + i])), None)
            if bad is not None:
                raise SGLangResponseError(
                    f"score: output {j}, token {s + bad} of {len(seq)}: expected id {seq[s + bad]} with a log-prob,"
                    f" the server reported {lps[bad][:2]}"
                )
            scores = TokenScores(logprobs=[float(lp[0]) for lp in lps], **_cache_counts(meta))
            if top_k:
                tops = (meta.get("input_top_logprobs") or [])[1:]
                if len(tops) != want or any(t is None or len(t) < top_k for t in tops):
                    raise SGLangResponseError(f"score: output {j} has no top-{top_k} log-probs for every position")
                scores.top_ids = [[int(x[1]) for x in t[:top_k]] for t in tops]
                scores.top_logprobs = [[float(x[0]) for x in t[:top_k]] for t in tops]
            result.append(scores)
        return result

    @staticmethod
    def _as_list(body: Any, n: int, what: str) -> list[dict[str, Any]]:
        outs = body if isinstance(body, list) else [body]
        if len(outs) != n or not all(isinstance(o, dict) for o in outs):
            raise SGLangResponseError(f"{what}: expected {n} outputs, got {len(outs)}")
        return outs

    def flush_cache(self) -> None:
        """Drop the prefix cache (after a weight update). The server answers in plain text."""
        import requests

        try:
            r = self.session.post(f"{self.url}/flush_cache", timeout=60)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise SGLangUnavailable(f"{self.url}/flush_cache: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise SGLangResponseError(f"{self.url}/flush_cache: HTTP {r.status_code}: {r.text[:300]}")

    def model_info(self) -> dict[str, Any]:
        return self.get("/model_info")
