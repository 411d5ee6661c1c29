"""The run directory: URIs kept as URIs, which keys a continuing run may change, the
shared-storage probe (one process here; two in tests/test_launch.py), argument order, and
one owner per run directory."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from maxgpt import cli
from maxgpt.config import ConfigError
from maxgpt.owner import Owner
from maxgpt.run_dir import RESUMABLE, RunDir, named_in, resumable
from maxgpt.storage import absolute, as_path, is_remote
from tests.conftest import REPO, make_config


def test_uris_are_never_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("gs://bucket/runs/x", "gs://bucket/runs/x/"):
        path = as_path(uri)
        assert is_remote(path) and str(absolute(path)).startswith("gs://bucket/runs/x")
        assert str(RunDir(uri).checkpoints) == "gs://bucket/runs/x/checkpoints"
    assert str(absolute("runs/x")) == str(tmp_path / "runs/x") and not is_remote("runs/x")
    assert named_in(["maxgpt", "train", "--run-dir", "gs://b/r"]) == "gs://b/r"
    assert named_in(["maxgpt", "train", "--run-dir=/x"]) == "/x"


def stored_run(tmp_path, *overrides):
    run = RunDir(tmp_path / "run")
    cfg = make_config("tiny", "data.streams=2", *overrides)
    run.write(cfg, None)
    return run, cfg


def test_continue_with_accepts_resumable_keys_and_names_the_first_other(tmp_path):
    run, stored = stored_run(tmp_path)
    assert RunDir(tmp_path / "new").continue_with(stored) == stored  # nothing stored yet
    changed = make_config("tiny", "train.steps=500", "mesh.fsdp=2", "checkpoint.every=7",
                          "model.remat=full", "train.microbatches=2", "data.streams=0")
    continued = run.continue_with(changed)
    assert continued.data.streams == 2  # 0 ("one per row share") keeps the run's number
    assert dataclasses.replace(continued, data=changed.data) == changed
    before = run.config_file.read_bytes()
    for key, value in (("optim.lr", 1e-4), ("model.embed_dim", 32), ("data.source", "builtin"),
                       ("train.seq_len", 16), ("data.streams", 4)):
        with pytest.raises(ConfigError, match=f"holds a run with {key}=.* asks for {key}="):
            run.continue_with(make_config("tiny", f"{key}={value}"))
    assert run.config_file.read_bytes() == before
    assert resumable("mesh.tensor") and resumable("checkpoint.every_minutes")
    assert all(resumable(k) for k in RESUMABLE) and not resumable("optim.warmup_steps")


def test_probe_of_a_run_dir_that_cannot_be_written(tmp_path):
    RunDir(tmp_path / "ok").check_shared()
    assert not os.listdir(tmp_path / "ok" / ".maxgpt-probes")  # the probe is cleaned up
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"cannot write the run directory .*file/run"):
        RunDir(tmp_path / "file" / "run").check_shared()


def test_overrides_are_taken_before_and_after_the_flags(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "train.steps=1", "--run-dir", str(run), "--config",
                     os.path.join(REPO, "configs/models/tiny.yaml"), "data.source=synthetic",
                     "train.eval_every=0"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 1 and saved["data"]["source"] == "synthetic"
    assert cli.main(["train", "--run-dir", str(run), "--bogus"]) == 2


def test_one_trainer_per_run_dir(tmp_path, capsys):
    """A second `maxgpt train` on a run that a live job trains is refused naming it; a dead
    owner (this host, no such pid) and a silent one (another host, old heartbeat) are taken
    over; the record is gone when a run ends."""
    run = tmp_path / "run"
    args = ["train", "--config", os.path.join(REPO, "configs/models/tiny.yaml"), "--run-dir",
            str(run), "data.source=synthetic", "train.eval_every=0", "train.log_every=1"]
    first = subprocess.Popen([sys.executable, "-m", "maxgpt", *args, "train.steps=100000"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:  # it owns the run once it trains
        if line.startswith("step 1/"):
            break
    record = json.loads((run / "owner.json").read_text())
    assert record["pid"] == first.pid and record["host"] == socket.gethostname()
    before = (run / "config.yaml").read_bytes()
    assert cli.main([*args, "train.steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {first.pid}" in err[0] and "another maxgpt train" in err[0]
    assert (run / "config.yaml").read_bytes() == before
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 0 and not (run / "owner.json").exists()

    (run / "owner.json").write_text(json.dumps({**record, "heartbeat": time.time()}))  # dead
    stopped = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert cli.main([*args, f"train.steps={stopped + 1}"]) == 0
    assert f"taking over {run} from host {record['host']} pid {first.pid}" in (
        capsys.readouterr().err)
    assert not (run / "owner.json").exists()

    elsewhere = {"host": "elsewhere", "pid": 1, "since": "then", "token": "t"}
    owner = Owner(as_path(run / "owner.json"))
    (run / "owner.json").write_text(json.dumps({**elsewhere, "heartbeat": time.time()}))
    with pytest.raises(ConfigError, match="host elsewhere, pid 1, since then"):
        owner.check()
    (run / "owner.json").write_text(json.dumps({**elsewhere, "heartbeat": time.time() - 3600}))
    owner.check()
    assert "its last heartbeat was 3600 s ago" in capsys.readouterr().err
