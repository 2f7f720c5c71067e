"""A real single-node Slurm cluster for the sbatch tests: `tools/slurm_local.sh up` once per session, `down` after.

It needs root (apt-get installs slurm-wlm and munge when missing; munged and slurmd are started as root). Where that
is impossible the tests fail with the reason: they are the only check that the sbatch scripts really run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"


@dataclass(frozen=True, slots=True)
class SlurmCluster:
    state_dir: Path
    env: dict[str, str]
    """This process's environment without any SLURM_* variable of an enclosing job, plus SLURM_CONF."""

    def run(self, *args: str | Path, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def jobcomp(self, job_id: str) -> dict[str, str]:
        """The job's completion record (jobcomp/filetxt): {"JobState": "FAILED", "ExitCode": "3:0", ...}."""
        path = self.state_dir / "jobcomp.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("JobId") == job_id:
                return fields
        return {}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The cluster, its state in a fresh directory under the system temp dir. Not under pytest's tmp_path: pytest's
    base temp directory is 0700, and munged refuses a socket below a directory that others cannot search."""
    if os.geteuid() != 0:
        pytest.fail("a local Slurm cluster needs root (apt-get install of slurm-wlm/munge; munged and slurmd)")
    state = Path(tempfile.mkdtemp(prefix="topd-slurm-test-"))
    up = subprocess.run(
        ["bash", str(SLURM_LOCAL), "up", str(state)], capture_output=True, text=True, timeout=900, env=clean_env()
    )
    if up.returncode != 0:
        subprocess.run(["bash", str(SLURM_LOCAL), "down", str(state)], capture_output=True, timeout=120)
        pytest.fail(
            f"tools/slurm_local.sh up could not start a local Slurm cluster (exit {up.returncode}):\n"
            f"{up.stderr[-3000:]}{up.stdout[-1000:]}"
        )
    conf = next(line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    try:
        yield SlurmCluster(state_dir=state, env=clean_env(SLURM_CONF=conf))
    finally:
        down = subprocess.run(
            ["bash", str(SLURM_LOCAL), "down", str(state)], capture_output=True, text=True, timeout=300
        )
        assert down.returncode == 0, f"tools/slurm_local.sh down failed:\n{down.stderr}"
        shutil.rmtree(state, ignore_errors=True)
