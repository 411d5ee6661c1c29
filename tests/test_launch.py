"""Multi-process runs on one machine: launch/local.py with 2 processes x 4 simulated devices,
stopped by SIGTERM and resumed on another process count, against one process."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from maxgpt import cli, loop, quantize, train
from maxgpt.config import load_config
from maxgpt.storage import as_path
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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The metric rows of the run on 1 process x 8 devices, with the 2 streams that 2
    processes x 4 devices get."""
    cfg = load_config(os.path.join(REPO, CONFIG), [*OVERRIDES, "data.streams=2"])
    return loop.run(cfg, tmp_path_factory.mktemp("one") / "run", echo=False)[1]


def start_two(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
                             *TRAIN, "--run-dir", str(run_dir), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after_some_steps(proc: subprocess.Popen, run_dir) -> int:
    """SIGTERM once 3 steps are logged; the step both processes agreed to stop after."""
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # passed on to both processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    stopped = [line for line in err.splitlines() if "stopped after step" in line]
    assert len(stopped) == 1 and stopped[0].startswith("[0] "), err  # agreed; 0 logs it
    step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= step < 40 and str(step) in stopped[0]
    return step


def assert_same_losses(run_dir, reference) -> None:
    expected, got = {r["step"]: r["loss"] for r in reference if "loss" in r}, rows(run_dir)
    assert sorted(got) == list(range(1, 41))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [expected[s] for s in sorted(expected)], rtol=2e-5)


def test_two_processes_stopped_and_resumed_on_one_equal_one_process(one_process, tmp_path):
    """The data order depends on data.streams, not on the process count: 2 processes x 4
    devices (2 streams: one per process), stopped by SIGTERM and resumed by 1 process x 8
    devices (reading both streams), give the losses of 1 process x 8 devices throughout."""
    reference = one_process
    two = tmp_path / "two"
    step = stop_after_some_steps(start_two(two), two)
    # each process saved the position of the stream it read
    data = two / "checkpoints" / str(step) / "data"
    assert [json.loads((data / f"process_{i}-of-2.json").read_text())["iterator"]["streams"]
            .keys() for i in range(2)] == [{"0"}, {"1"}]
    assert yaml.safe_load((two / "config.yaml").read_text())["data"]["streams"] == 2

    assert cli.main(["train", "--run-dir", str(two)]) == 0  # continues from config.yaml
    assert_same_losses(two, reference)
    np.testing.assert_allclose(
        [rows(two, "eval_loss")[s] for s in (20, 40)],
        [r["eval_loss"] for r in reference if "eval_loss" in r], rtol=2e-5)


def test_two_processes_on_a_bucket_restarted_by_the_same_command(one_process, bucket,
                                                                    capsys):
    """2 processes x 4 devices on a gs:// run dir, saving on a timer (every_minutes tiny: a
    save every other step, decided by all processes together), stopped by SIGTERM and
    started again by the very same command: the losses of one process throughout. Then
    int8 weights for evaluation, saved to the bucket by both processes."""
    run_dir = as_path(bucket)
    timed = "checkpoint.every_minutes=1e-9"
    step = stop_after_some_steps(start_two(run_dir, timed), run_dir)
    out, err = start_two(run_dir, timed).communicate(timeout=300)
    assert f"[0] resumed from {bucket}/checkpoints/{step}" in err, err
    assert_same_losses(run_dir, one_process)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert saved[-1] == 40 and len(saved) == 3  # checkpoint.keep=3, the newest: timed saves
    assert all(s % 10 for s in saved[:-1])  # ... between the every-10-steps ones

    # int8 weights for evaluation: quantized and saved to the bucket by the two processes
    # together, then read back (not quantized again) by one process: the same eval loss
    two = subprocess.run([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
                          sys.executable, "-m", "maxgpt", "eval", "--run-dir", bucket,
                          "--quantize", "int8"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    [line] = [x for x in two.stdout.splitlines() if x.startswith("[0] {")]
    saved = run_dir / "quantized" / "step-40-int8-g0"
    assert saved.is_dir() and list(saved.iterdir())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "quantize_weights", None)  # reading them must not quantize
        assert cli.main(["eval", "--run-dir", bucket, "--quantize", "int8"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(line[len("[0] "):])["eval_loss"] == pytest.approx(one["eval_loss"],
                                                                         rel=1e-5)


def test_processes_that_do_not_share_the_run_dir_stop_at_once(tmp_path):
    """Each process its own local folder (what separate hosts' disks are): one line on
    every process naming the hosts and the path, exit 2, seconds after the start."""
    started = time.monotonic()
    own = f"{shlex.join(TRAIN)} --run-dir {tmp_path}/own$MAXGPT_PROCESS_ID"
    done = subprocess.run([*LAUNCH, "--processes", "2", "--devices-per-process", "4", "--",
                           "sh", "-c", f"exec {own}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "maxgpt: error:" in line]
    assert len(errors) == 2 and all("does not see the files process" in e for e in errors)
    assert {e.split()[0] for e in errors} == {"[0]", "[1]"}
    assert time.monotonic() - started < 60
    assert not (tmp_path / "own0" / "config.yaml").exists()


INTERLEAVED = """
import json, sys
import jax
from maxgpt import distributed, loop, sharding, train
from maxgpt.config import load_config
from maxgpt.storage import as_path
distributed.initialize()
own = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
devices = [d for pair in zip(*own) for d in pair]  # p0, p1, p0, p1, ...
cfg = load_config(sys.argv[1], sys.argv[3:])
rows = sharding.batch_rows(sharding.batch_sharding(sharding.make_mesh(cfg.mesh, devices)), 8)
_, history = loop.run(cfg, devices=devices, echo=False)
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
    _, reference = loop.run(cfg, tmp_path / "one", echo=False)

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
