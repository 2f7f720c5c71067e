"""The client's handling of answers a healthy SGLang server never gives (malformed, short, error statuses).

A real server cannot be made to send these, so a small local HTTP server plays them back; everything a real server
does answer is tested against SGLang itself in tests/sglang/.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient, SGLangResponseError, SGLangUnavailable


class _Replay(BaseHTTPRequestHandler):
    answers: list[tuple[int, str]] = []
    hits = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).hits += 1
        status, body = self.answers[min(type(self).hits - 1, len(self.answers) - 1)]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def replay() -> Iterator[tuple[str, type[_Replay]]]:
    handler = type("Replay", (_Replay,), {"answers": [], "hits": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def _gen(ids: list[int], lps: list[float]) -> dict:
    return {
        "output_ids": ids,
        "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids, strict=False)]},
    }


PARAMS = SamplingParams(max_new_tokens=4, stop_token_ids=(2,))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([{"meta_info": {}}, _gen([2], [-0.3])], "lacks output_ids"),
        ([_gen([5, 6], [-0.1, -0.2])], "expected 2 outputs, got 1"),
        ([_gen([5, 6], [-0.1]), _gen([2], [-0.3])], "2 tokens but 1 log-probs"),
        ([_gen([], []), _gen([2], [-0.3])], "is empty"),
    ],
)
def test_malformed_or_short_generations_are_named(replay, answer, message: str) -> None:
    url, handler = replay
    handler.answers = [(200, json.dumps(answer))]
    with pytest.raises(SGLangResponseError, match=message):
        SGLangClient(url).generate([[1, 3], [1, 4]], PARAMS)


def test_a_short_score_is_refused(replay) -> None:
    url, handler = replay
    meta = {"input_token_logprobs": [[None, 3, None], [-0.5, 4, None]]}  # one scored token for two asked
    handler.answers = [(200, json.dumps([{"output_ids": [], "meta_info": meta}]))]
    with pytest.raises(SGLangResponseError, match="1 input log-probs for 2 tokens"):
        SGLangClient(url).score([[1, 3, 4, 5]], [2])
    meta = {"input_token_logprobs": [[None, 3, None], [-0.5, 4, None], [-0.7, 9, None]]}  # 9 is not token 3 (5)
    handler.answers = [(200, json.dumps([{"output_ids": [], "meta_info": meta}]))]
    with pytest.raises(SGLangResponseError, match=r"token 3 of 4: expected id 5 with a log-prob, .* \[-0.7, 9\]"):
        SGLangClient(url).score([[1, 3, 4, 5]], [2])


def test_client_errors_are_not_retried_and_server_errors_are(replay) -> None:
    url, handler = replay
    handler.answers = [(400, '{"error": "bad sampling_params"}')]
    with pytest.raises(SGLangResponseError, match="HTTP 400.*bad sampling_params"):
        SGLangClient(url, max_retries=3).generate([[1, 3]], PARAMS)
    assert handler.hits == 1
    handler.hits, handler.answers = 0, [(503, "{}"), (200, json.dumps([_gen([2], [-0.1])]))]
    (gen,) = SGLangClient(url, max_retries=3).generate([[1, 3]], PARAMS)
    assert handler.hits == 2 and gen.output_ids == [2] and gen.finished
    handler.hits, handler.answers = 0, [(503, "{}")]
    with pytest.raises(SGLangUnavailable, match="after 3 attempt"):
        SGLangClient(url, max_retries=2).generate([[1, 3]], PARAMS)
    assert handler.hits == 3


def test_an_answer_that_is_not_json_is_named(replay) -> None:
    url, handler = replay
    handler.answers = [(200, "<html>proxy error</html>")]
    with pytest.raises(SGLangResponseError, match="not JSON"):
        SGLangClient(url).generate([[1, 3]], PARAMS)


def test_the_last_vocabulary_id_reported_as_zero_is_accepted_only_with_the_vocab_size(replay) -> None:
    """SGLang 0.5.23 reports input id vocab_size - 1 as 0 (its log-prob is the right token's)."""
    url, handler = replay
    meta = {"input_token_logprobs": [[None, 3, None], [-0.5, 4, None], [-0.7, 0, None]]}
    answer = json.dumps([{"output_ids": [], "meta_info": meta}])
    handler.answers = [(200, answer)]
    with pytest.raises(SGLangResponseError, match=r"expected id 191 with a log-prob, the server reported \[-0.7, 0\]"):
        SGLangClient(url).score([[1, 3, 4, 191]], [2])
    handler.answers = [(200, answer)]
    (scores,) = SGLangClient(url).score([[1, 3, 4, 191]], [2], vocab_size=192)
    assert scores.logprobs == [-0.5, -0.7]
    handler.answers = [(200, answer)]
    with pytest.raises(SGLangResponseError, match="expected id 190"):  # any other id must match exactly
        SGLangClient(url).score([[1, 3, 4, 190]], [2], vocab_size=192)
