"""Checkpoints: exact resume after SIGTERM and SIGKILL (real processes), resharding restore,
fallback from a damaged checkpoint, the non-finite guard, and the errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maxgpt import loop, train
from maxgpt.config import ConfigError
from maxgpt.data import SyntheticSource
from maxgpt.storage import as_path
from tests.conftest import REPO, make_config, no_compile_cache

STEPS = 30
# The smoke run (tiny model, built-in corpus, 512-piece tokenizer), saving every step.
ARGS = ["--config", os.path.join(REPO, "configs/experiments/smoke.yaml"), f"train.steps={STEPS}",
        "train.log_every=1", "train.eval_every=0", "checkpoint.every=1", "checkpoint.keep=2",
        "data.num_workers=0"]


def start(run_dir, cwd=REPO) -> subprocess.Popen:
    """The same command every time (a restart is the first command again)."""
    return subprocess.Popen([sys.executable, "-m", "maxgpt", "train", "--run-dir", str(run_dir),
                             *ARGS], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(proc: subprocess.Popen, step: int) -> None:
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


def final_params(run_dir) -> dict:
    """Read the last checkpoint with plain orbax, as docs/checkpoints.md says one can."""
    step_dir = run_dir / "checkpoints" / str(STEPS) / "state"
    state = ocp.StandardCheckpointer().restore(step_dir)
    return jax.tree.map(np.asarray, state["params"])


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows)  # one row per step, also after resume
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = start(run_dir)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return run_dir


def assert_same_run(a, b) -> None:
    assert losses(a) == losses(b)
    for x, y in zip(jax.tree.leaves(final_params(a)), jax.tree.leaves(final_params(b))):
        np.testing.assert_array_equal(x, y)  # bit for bit


def test_sigterm_saves_exits_0_and_resumes_bit_for_bit(straight, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "SIGTERM: stopped after step" in err
    stopped = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= stopped < STEPS
    proc = start(run_dir)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert f"resumed from {run_dir.absolute() / 'checkpoints' / str(stopped)}" in err
    assert_same_run(straight, run_dir)


def test_sigkill_during_asynchronous_saves_never_breaks_the_resume(straight, tmp_path):
    """Killed twice while saving every step (most of a step's time is the save), resumed
    each time: the run ends exactly as the uninterrupted one."""
    run_dir = tmp_path / "run"
    in_flight = []
    for kill_after in (4, 12):
        proc = start(run_dir)
        wait_for_step(proc, kill_after)
        proc.kill()
        proc.wait()
        in_flight += [p.name for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]
    assert in_flight  # a save was being written when the process died (e.g. '3.orbax-...-tmp')
    proc = start(run_dir)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert_same_run(straight, run_dir)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigkill_during_asynchronous_saves_on_a_bucket(straight, bucket, tmp_path):
    """The same on gs:// (orbax commits a step there with a commit_success.txt instead of a
    rename): killed while saving, resumed by the same command, bit for bit the straight
    run; the metrics rows written before the kill are in the bucket; nothing of the run is
    written locally."""
    run_dir = as_path(bucket)
    in_flight = []
    for kill_after in (4, 12):
        proc = start(run_dir, cwd=tmp_path)
        wait_for_step(proc, kill_after)
        proc.kill()
        proc.wait()
        in_flight += [p.name for p in (run_dir / "checkpoints").iterdir()
                      if p.name.isdigit() and not (p / "commit_success.txt").exists()]
        rows = [json.loads(x)["step"] for x in
                (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows == list(range(1, len(rows) + 1))  # flushed before the kill
    assert in_flight  # a save was being written when the process died
    proc = start(run_dir, cwd=tmp_path)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert_same_run(straight, run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert os.listdir(tmp_path) == []  # no local `gs:` folder, nothing else either


def in_process(*overrides):
    return make_config("tiny", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
                       "optim.decay=constant", "optim.warmup_steps=0", "model.dtype=float32",
                       *overrides)


def test_restore_onto_other_meshes_continues_with_the_same_losses(tmp_path):
    cfg = in_process("train.steps=6", "checkpoint.every=3", "mesh.data=1", "mesh.fsdp=8")
    _, straight_rows = loop.run(cfg, tmp_path / "straight", echo=False)
    half = in_process("train.steps=3", "checkpoint.every=3", "mesh.data=1", "mesh.fsdp=8")
    loop.run(half, tmp_path / "half", echo=False)
    for name, mesh, devices in [("3axis", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), None),
                                ("4dev", ("mesh.data=1", "mesh.fsdp=4"), jax.devices()[:4])]:
        shutil.copytree(tmp_path / "half", tmp_path / name)
        cfg = in_process("train.steps=6", "checkpoint.every=3", *mesh)
        _, rows = loop.run(cfg, tmp_path / name, devices=devices, echo=False)
        assert [r["step"] for r in rows] == [4, 5, 6]
        np.testing.assert_allclose([r["loss"] for r in rows],
                                   [r["loss"] for r in straight_rows[3:]], rtol=2e-5)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capfd):
    cfg = in_process("train.steps=6", "checkpoint.every=3")
    _, rows = loop.run(cfg, tmp_path / "run", echo=False)
    for f in (tmp_path / "run/checkpoints/6/state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 16)  # the array data, overwritten
    _, again = loop.run(cfg, tmp_path / "run", echo=False)
    assert "checkpoints/6 is unreadable" in capfd.readouterr().err
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[3:]]  # resumed from 3
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert "3" in names and "6" in names and any(n.startswith("6.unreadable-") for n in names)


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    cfg = in_process("train.steps=3", "checkpoint.every=3")
    loop.run(cfg, tmp_path / "run", echo=False)
    for f in (tmp_path / "run/checkpoints/3/state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        loop.run(in_process("train.steps=6", "checkpoint.every=3"), tmp_path / "run",
                  echo=False)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["3"]


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    """NaN is injected into the loss of marked batches (steps 3, then 5 and 6)."""
    marked = {2}
    real_next, real_loss = SyntheticSource.__next__, train.loss_fn

    def next_marked(self):
        step = self.step
        batch = real_next(self)
        if step in marked:
            batch["segment_ids"][0, 0] = 9  # a marker the patched loss turns into NaN
        return batch

    def nan_loss(params, graphdef, batch, key, *weights):
        objective, (nll, tokens, moe) = real_loss(params, graphdef, batch, key, *weights)
        nan = jnp.where(batch["segment_ids"][0, 0] == 9, jnp.nan, 0.0)
        return objective + nan, (nll + nan, tokens, moe)

    monkeypatch.setattr(SyntheticSource, "__next__", next_marked)
    monkeypatch.setattr(train, "loss_fn", nan_loss)
    cfg = in_process("train.steps=4", "checkpoint.every=1", "train.max_bad_steps=2",
                     "mesh.data=1")
    state, rows = loop.run(cfg, tmp_path / "run", devices=jax.devices()[:1], echo=False)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert rows[2]["loss"] is None  # NaN, logged as null
    ckpt = ocp.StandardCheckpointer()
    after2 = ckpt.restore(tmp_path / "run/checkpoints/2/state")
    after3 = ckpt.restore(tmp_path / "run/checkpoints/3/state")
    for a, b in zip(jax.tree.leaves(after2["params"]), jax.tree.leaves(after3["params"])):
        np.testing.assert_array_equal(a, b)  # step 3 changed nothing
    assert int(after3["step"]) == 3 and int(state["skipped_steps"]) == 1

    marked.update({4, 5})  # steps 5 and 6: two in a row
    more = in_process("train.steps=8", "checkpoint.every=1", "train.max_bad_steps=2",
                      "mesh.data=1")
    with pytest.raises(ConfigError, match="2 steps in a row up to step 6"):
        loop.run(more, tmp_path / "run", devices=jax.devices()[:1], echo=False)
    for step in (5, 6):  # what was saved holds finite values
        saved = ckpt.restore(tmp_path / f"run/checkpoints/{step}/state")
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


def test_another_architecture_names_the_first_mismatched_parameter(tmp_path):
    loop.run(in_process("train.steps=1"), tmp_path / "run", echo=False)
    with pytest.raises(ConfigError, match=r"parameter blocks/attn/k_proj is \(2, 64, 2, 16\) "
                                          r"there but \(2, 32, 2, 8\) in this config"):
        loop.run(in_process("train.steps=2", "model.embed_dim=32",
                             f"checkpoint.load_params_from={tmp_path / 'run'}"),
                  tmp_path / "other", echo=False)
    with pytest.raises(ConfigError, match="holds a run with model.embed_dim=64, this command "
                                          "asks for model.embed_dim=32"):
        loop.run(in_process("train.steps=2", "model.embed_dim=32"), tmp_path / "run",
                  echo=False)


def test_load_params_from_starts_a_new_run(tmp_path):
    source_state, _ = loop.run(in_process("train.steps=2"), tmp_path / "a", echo=False)
    cfg = in_process("train.steps=1", f"checkpoint.load_params_from={tmp_path / 'a'}")
    trainer = train.build_trainer(cfg, train.sharding.make_mesh(cfg.mesh))
    with jax.set_mesh(trainer.mesh):
        state, first = loop.restore_or_init(trainer, None, None, {}, loop.MetricsWriter(
            None, 1, echo=False))
    assert first == 0 and int(state["step"]) == 0
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(source_state["params"])):
        np.testing.assert_array_equal(a, b)
    mu = jax.tree.leaves(state["opt_state"])
    assert all(float(jnp.abs(x).max()) == 0 for x in mu)  # a fresh optimizer
    with pytest.raises(ConfigError, match="no checkpoints there"):
        bad = in_process(f"checkpoint.load_params_from={tmp_path / 'missing'}")
        loop.restore_or_init(train.build_trainer(bad, trainer.mesh), None, None, {},
                              loop.MetricsWriter(None, 1, echo=False))


def test_keep_newest_and_every_kth(tmp_path):
    loop.run(in_process("train.steps=8", "checkpoint.every=1", "checkpoint.keep=2",
                         "checkpoint.keep_every=4"), tmp_path / "run", echo=False)
    assert sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir()) == [4, 7, 8]


def test_timed_saves(tmp_path):
    """checkpoint.every_minutes: once the time has passed (here at once), the processes'
    votes decide one step later and the clock restarts at each save: every other step, and
    the last; the every-N-steps saves stay as they were."""
    loop.run(in_process("train.steps=7", "checkpoint.every=0", "checkpoint.keep=100",
                         "checkpoint.every_minutes=1e-9"), tmp_path / "timed", echo=False)
    assert sorted(int(p.name) for p in (tmp_path / "timed/checkpoints").iterdir()) == [
        2, 4, 6, 7]


def test_unwritable_run_dir_is_reported_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write the run directory"):
        loop.run(in_process("train.steps=1"), tmp_path / "file/run", echo=False)
    assert os.path.isfile(tmp_path / "file")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the smoke model (about 1.7 MB), not two. A
    real full file system, not a fault injected in maxgpt (CI runs as root, as here)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_resumes(small_disk):
    run_dir = small_disk / "run"
    args = [sys.executable, "-m", "maxgpt", "train", "--run-dir", str(run_dir),
            "--config", os.path.join(REPO, "configs/experiments/smoke.yaml"), "train.steps=40",
            "checkpoint.every=5", "checkpoint.keep=10", "train.eval_every=0",
            "data.num_workers=0"]
    started = time.monotonic()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("maxgpt: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    found = re.search(r"saving checkpoint (\d+) in \S+ failed: .*No space left on device.*; "
                      r"the newest complete checkpoint is (\S+)/(\d+);", errors[0])
    assert found and found.group(2) == f"{run_dir}/checkpoints", errors[0]
    failed, good = int(found.group(1)), int(found.group(3))
    assert good == failed - 5 and good >= 5
    assert time.monotonic() - started < 120  # seconds after the failure, not at the end
    trained = [int(line.split()[1].split("/")[0]) for line in done.stdout.splitlines()
               if line.startswith("step ")]
    assert max(trained) < failed + 10  # stopped right after the failed save, not at 40
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/{good}" in again.stderr
    assert max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == 40


def test_signals_during_the_first_compile_are_heard_at_once(tmp_path):
    """SIGINT while XLA compiles (a deep unrolled stack: seconds): acknowledged at once, then
    the run trains one step, saves and exits 0; a second SIGINT stops it at once, exit 130,
    before the compile ends."""
    def start(run_dir):
        proc = subprocess.Popen(
            [sys.executable, "-m", "maxgpt", "train", "--run-dir", str(run_dir), *ARGS,
             "model.num_layers=24", "model.unroll_layers=-1"], cwd=REPO, env=no_compile_cache(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # the line printed just before the compile starts
            if line.startswith("maxgpt: tiny,"):
                return proc
        raise AssertionError(proc.communicate())

    proc = start(tmp_path / "once")
    proc.send_signal(signal.SIGINT)
    heard = time.monotonic()
    line = proc.stderr.readline()
    assert line.startswith("maxgpt: SIGINT: stopping after the current step"), line
    assert time.monotonic() - heard < 2
    assert proc.stderr.readline().startswith("compiled train step")  # heard while compiling
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "SIGINT: stopped after step 1, checkpoint saved" in err
    assert (tmp_path / "once/checkpoints/1").is_dir()

    proc = start(tmp_path / "twice")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().startswith("maxgpt: SIGINT: stopping")
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "compiled train step" not in err, err
    assert time.monotonic() - stopped < 5


def test_checkpoints_that_turn_read_only_mid_run_stop_it_within_seconds(tmp_path):
    """checkpoints/ made read-only after the first checkpoint (a tmpfs mounted there, then
    remounted read-only: what lost permissions look like to root, whom chmod does not stop):
    one line, exit 2, seconds later; the checkpoint before it resumes once it is writable."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    # A file system of its own: a tmpfs can be remounted read-only in containers that refuse
    # a read-only remount of a bind mount.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(checkpoints)],
                   check=True)
    args = [sys.executable, "-m", "maxgpt", "train", "--run-dir", str(run_dir), *ARGS[:2],
            "train.log_every=1", "checkpoint.every=5", "train.eval_every=0",
            "data.num_workers=0"]
    try:
        proc = subprocess.Popen([*args, "train.steps=100000"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_step(proc, 7)
            while not (checkpoints / "5").is_dir():  # renamed into place once complete
                time.sleep(0.1)
            for _ in range(400):  # refused (busy) while a save has a file open for writing
                if subprocess.run(["mount", "-o", "remount,ro", str(checkpoints)],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("could not remount the tmpfs read-only")
            turned = time.monotonic()
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 2, err[-3000:]
        assert time.monotonic() - turned < 30
        errors = [line for line in err.splitlines() if line.startswith("maxgpt: error:")]
        assert len(errors) == 1 and "Read-only file system" in errors[0], err[-3000:]
        assert "Traceback" not in err and "never retrieved" not in err, err[-3000:]
        newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
        assert newest >= 5
        assert f"newest complete checkpoint is {checkpoints}/{newest}" in errors[0]
        subprocess.run(["mount", "-o", "remount,rw", str(checkpoints)], check=True)
        again = subprocess.run([*args, f"train.steps={newest + 1}"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {checkpoints}/{newest}" in again.stderr
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)
