"""benchmarks/gpu_check.sh, dry: where there is no NVIDIA GPU it must stop at once, clearly,
before installing anything (the check itself runs only on a GPU machine)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOT = Path(REPO)

pytestmark = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                                reason="a GPU machine runs the real check, not the dry run")


def test_the_script_stops_at_once_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds "
                                   "none); run it on one")
    assert not (ROOT / ".venv-gpu").exists() and not (tmp_path / "out").exists()


def test_the_python_check_refuses_a_cpu():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", "/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "gpu_check: no GPU for JAX" in proc.stderr
