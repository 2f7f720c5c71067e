"""API keys stay out of command lines, environments, logs, metrics and configs.

A real SGLang server is started with a key read from a 0600 file (and SGLang's INFO logging on, which prints its
server arguments): while it runs, no process on the machine has the key in its command line (`ps`, /proc/*/cmdline)
or its environment; requests without the key, or with another one, are refused (HTTP 401; SGLang leaves only its
health probes open) and requests with it are served; after it stops, no file written by it holds the key. Key
sources are checked: a file readable by others, an unset variable, and a key given as a config value are refused.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest
import requests

from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient
from topd_megatron.rollout.sglang.server import ServerConfig, launch_server


def processes_holding(secret: str) -> list[str]:
    """Every process whose command line or environment holds `secret` ("PID cmdline|environ"), and whether `ps`
    prints it."""
    hits = []
    for proc in Path("/proc").glob("[0-9]*"):
        for part in ("cmdline", "environ"):
            try:
                if secret.encode() in (proc / part).read_bytes():
                    args = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
                    hits.append(f"{proc.name} {part} ({args})")
            except OSError:
                continue  # gone, or a kernel thread
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
    return hits + (["ps"] if secret in ps else [])


def files_holding(root: Path, secret: str, *, besides: tuple[Path, ...] = ()) -> list[Path]:
    """Every file under `root` (but `besides`) whose bytes contain `secret`."""
    return [p for p in root.rglob("*") if p.is_file() and p not in besides and secret.encode() in p.read_bytes()]


def test_a_server_key_stays_out_of_command_lines_logs_and_files(synthetic_pair, tmp_path: Path) -> None:
    key = secrets.token_urlsafe(24)
    key_file = tmp_path / "secure" / "sglang.key"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    cfg = ServerConfig(
        model_path=str(synthetic_pair[0]),
        api_key_file=str(key_file),
        startup_timeout_s=600,
        extra_args=("--log-level", "info"),  # SGLang then logs its server arguments, the key among them
    )
    server = launch_server(cfg, log_dir=tmp_path / "logs")
    try:
        assert processes_holding(key) == []
        body = {"input_ids": [1, 5, 7], "sampling_params": {"max_new_tokens": 2}}
        assert requests.post(f"{server.url}/generate", json=body, timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert requests.post(f"{server.url}/generate", json=body, headers=wrong, timeout=60).status_code == 401
        assert requests.post(f"{server.url}/flush_cache", timeout=60).status_code == 401
        assert requests.get(f"{server.url}/model_info", timeout=60).status_code == 401
        (gen,) = SGLangClient(server.url, api_key=key).generate([[1, 5, 7]], SamplingParams(max_new_tokens=3))
        assert len(gen.output_ids) > 0
        log = server.log_path.read_text()
        assert "api_key" in log and "***" in log, "SGLang logged its server arguments, with the key masked"
    finally:
        server.stop()
    assert files_holding(tmp_path, key, besides=(key_file,)) == []


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "sglang.key"
    key_file.write_text("k3y")
    key_file.chmod(0o644)
    cfg = ServerConfig(model_path=str(tmp_path), api_key_file=str(key_file))
    with pytest.raises(ValueError, match=f"mode 0644, readable beyond its owner; run `chmod 600 {key_file}`"):
        launch_server(cfg, log_dir=tmp_path)


def test_an_unset_key_variable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOPD_TEST_NO_SUCH_KEY", raising=False)
    cfg = ServerConfig(url="http://127.0.0.1:1", api_key_env="TOPD_TEST_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="the environment variable TOPD_TEST_NO_SUCH_KEY is not set"):
        launch_server(cfg, log_dir=tmp_path)


def test_a_key_is_never_a_config_value() -> None:
    """A RunConfig names where the key is, never the key: there is no field to put it in, and a variable name that
    looks like a key is refused."""
    from topd_megatron import recipes

    with pytest.raises(ValueError, match="unknown override key 'sglang.student.api_key'.*api_key_env"):
        recipes.get("tiny", ["sglang.student.api_key=k3y"])
    with pytest.raises(ValueError, match="must name an environment variable"):
        ServerConfig(url="http://127.0.0.1:1", api_key_env="sk-live/abc+def")
    cfg = recipes.get("tiny", ["sglang.student.api_key_env=TOPD_SGLANG_API_KEY"])
    assert cfg.sglang.student.api_key_env == "TOPD_SGLANG_API_KEY"
