"""Multi-process runs on one machine: launch/local.py with 2 processes x 4 simulated devices,
stopped by SIGTERM and resumed on another process count, against one process."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from maxgpt import cli, train
from maxgpt.config import load_config
from tests.conftest import REPO

LAUNCH = [sys.executable, os.path.join(REPO, "launch", "local.py")]
CONFIG = "configs/experiments/smoke.yaml"
OVERRIDES = ["train.steps=40", "train.log_every=1", "checkpoint.every=10",
             "train.eval_every=20", "mesh.data=2", "mesh.fsdp=4"]
TRAIN = [sys.executable, "-m", "maxgpt", "train", "--config", CONFIG, *OVERRIDES]


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


def test_two_processes_stopped_and_resumed_on_one_equal_one_process(tmp_path):
    """The data order depends on data.streams, not on the process count: 2 processes x 4
    devices (2 streams: one per process), stopped by SIGTERM and resumed by 1 process x 8
    devices (reading both streams), give the losses of 1 process x 8 devices throughout."""
    cfg = load_config(os.path.join(REPO, CONFIG), [*OVERRIDES, "data.streams=2"])
    _, reference = train.run(cfg, tmp_path / "one", echo=False)

    two = tmp_path / "two"
    proc = subprocess.Popen([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
                             *TRAIN, "--run-dir", str(two)], cwd=REPO,
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
    # each process saved the position of the stream it read
    data = two / "checkpoints" / str(step) / "data"
    assert [json.loads((data / f"process_{i}-of-2.json").read_text())["iterator"]["streams"]
            .keys() for i in range(2)] == [{"0"}, {"1"}]
    assert yaml.safe_load((two / "config.yaml").read_text())["data"]["streams"] == 2

    assert cli.main(["train", "--run-dir", str(two)]) == 0  # continues from config.yaml
    expected, got = {r["step"]: r["loss"] for r in reference if "loss" in r}, rows(two)
    assert sorted(got) == list(range(1, 41))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(expected)], rtol=2e-5)
    np.testing.assert_allclose(
        [rows(two, "eval_loss")[s] for s in (20, 40)],
        [r["eval_loss"] for r in reference if "eval_loss" in r], rtol=2e-5)


INTERLEAVED = """
import json, sys
import jax
from maxgpt import distributed, sharding, train
from maxgpt.config import load_config
distributed.initialize()
own = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
devices = [d for pair in zip(*own) for d in pair]  # p0, p1, p0, p1, ...
cfg = load_config(sys.argv[1], sys.argv[3:])
rows = sharding.batch_rows(sharding.batch_sharding(sharding.make_mesh(cfg.mesh, devices)), 8)
_, history = train.run(cfg, devices=devices, echo=False)
if jax.process_index() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"rows": rows, "history": history}, f)
"""


def test_processes_feeding_rows_that_are_not_contiguous(tmp_path):
    """A mesh whose devices alternate between the processes gives process 0 batch rows 0, 2,
    4, 6 (rows of both streams): each process reads both streams and keeps its rows, and
    training and evaluation equal one process."""
    overrides = ["train.steps=4", "train.log_every=1", "train.eval_every=4",
                 "mesh.data=2", "mesh.fsdp=4", "data.streams=2"]
    cfg = load_config(os.path.join(REPO, CONFIG), overrides)
    _, reference = train.run(cfg, tmp_path / "one", echo=False)

    out = tmp_path / "history.json"
    done = subprocess.run([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
                           sys.executable, "-c", INTERLEAVED, CONFIG, str(out), *overrides],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["rows"] == [0, 2, 4, 6]
    got = result["history"]
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for key in ("loss", "eval_loss"):
        np.testing.assert_allclose([r[key] for r in got if key in r],
                                   [r[key] for r in reference if key in r], rtol=2e-5)
