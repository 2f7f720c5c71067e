"""SGLang servers on CPU shared by the tests of this folder (one start each per test session: ~30-60 s apiece)."""

from __future__ import annotations

import pytest

from topd_megatron.rollout.sglang.server import ServerConfig, launch_server


@pytest.fixture(scope="session")
def student_server(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    """The synthetic pair's student. Tests that push other weights into it put the student's back."""
    server = launch_server(
        ServerConfig(model_path=str(synthetic_pair[0]), startup_timeout_s=600),
        log_dir=tmp_path_factory.mktemp("sglang-logs"),
    )
    yield server
    server.stop()
    assert not server.alive()


@pytest.fixture(scope="session")
def teacher_server(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    server = launch_server(
        ServerConfig(role="teacher", model_path=str(synthetic_pair[1]), startup_timeout_s=600),
        log_dir=tmp_path_factory.mktemp("sglang-teacher-logs"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dummy_student_server(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    """A student server holding random (dummy) weights: whoever attaches to it must push the student's first."""
    server = launch_server(
        ServerConfig(model_path=str(synthetic_pair[0]), startup_timeout_s=600, extra_args=("--load-format", "dummy")),
        log_dir=tmp_path_factory.mktemp("sglang-dummy-logs"),
    )
    yield server
    server.stop()
