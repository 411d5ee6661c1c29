"""Multi-process runs on one machine: launch/local.py with 2 processes x 4 simulated devices,
stopped by SIGTERM and resumed, against the same run uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import REPO

LAUNCH = [sys.executable, os.path.join(REPO, "launch", "local.py")]
TRAIN = [sys.executable, "-m", "maxgpt", "train", "--config", "configs/experiments/smoke.yaml",
         "train.steps=40", "train.log_every=1", "checkpoint.every=10", "train.eval_every=20",
         "mesh.data=2", "mesh.fsdp=4"]


def rows(run_dir, kind="loss"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[kind] for r in map(json.loads, lines) if kind in r}


def test_dry_run_prints_each_process_environment_and_command():
    out = subprocess.run([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--port",
                          "5555", "--dry-run", "--", "maxgpt", "train", "train.steps=3"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    for i, line in enumerate(out):
        assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_"
                               "count=4 MAXGPT_COORDINATOR=127.0.0.1:5555 "
                               f"MAXGPT_NUM_PROCESSES=2 MAXGPT_PROCESS_ID={i} ")
        assert line.endswith(" maxgpt train train.steps=3")


def test_two_processes_stopped_and_resumed_equal_an_uninterrupted_run(tmp_path):
    """Each process feeds its own share of every batch (so 2 processes read other batches
    than 1 process would: see docs/launch.md); stopping and resuming must change nothing."""
    launch = [*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--"]
    straight = subprocess.run([*launch, *TRAIN, "--run-dir", str(tmp_path / "straight")],
                              cwd=REPO, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert straight.stdout.count("--- sample") == 1  # all processes sample, process 0 prints

    two = tmp_path / "two"
    proc = subprocess.Popen([*launch, *TRAIN, "--run-dir", str(two)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((two / "metrics.jsonl").exists() and len(rows(two)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # passed on to both processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    stopped = [line for line in err.splitlines() if "stopped after step" in line]
    assert len(stopped) == 1 and stopped[0].startswith("[0] "), err  # agreed; 0 logs it
    step = max(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= step < 40 and str(step) in stopped[0]
    # each process saved its own data position
    assert sorted(p.name for p in (two / "checkpoints" / str(step) / "data").iterdir()
                  if p.name.startswith("process_")) == ["process_0-of-2.json",
                                                        "process_1-of-2.json"]

    resumed = subprocess.run([*launch, *TRAIN[:4], "--run-dir", str(two)], cwd=REPO,
                             capture_output=True, text=True)  # continues from config.yaml
    assert resumed.returncode == 0, resumed.stderr
    expected, got = rows(tmp_path / "straight"), rows(two)
    assert sorted(got) == list(range(1, 41))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(expected)], rtol=2e-5)
    np.testing.assert_allclose(
        [rows(two, "eval_loss")[s] for s in (20, 40)],
        [rows(tmp_path / "straight", "eval_loss")[s] for s in (20, 40)], rtol=2e-5)
