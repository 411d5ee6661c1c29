"""Runs that live in a bucket: every command on gs:// paths against a real GCS JSON API
(fake-gcs-server on 127.0.0.1, tests/conftest.py), compared with the same commands on local
folders, and nothing of a gs:// run written locally."""

import contextlib
import hashlib
import json
import os
import time

import fsspec
import jax
import numpy as np
import pytest

from maxgpt import cli, loop, train
from maxgpt.checkpoint import Checkpointer
from maxgpt.config import load_config
from maxgpt.data.pipeline import batches, resolve_corpus
from maxgpt.metrics import MetricsWriter
from maxgpt.run_dir import RunDir
from maxgpt.storage import as_path
from tests.conftest import REPO

SMOKE = os.path.join(REPO, "configs", "experiments", "smoke.yaml")
FIRST = ["--config", SMOKE, "train.steps=4", "train.log_every=1", "checkpoint.every=2",
         "train.eval_every=4", "data.num_workers=0"]


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (as_path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tree_hashes(root: str) -> dict[str, str]:
    """Every object under the gs:// prefix `root`, by name: its content's SHA-256."""
    as_path(root)  # gcsfs set up as maxgpt sets it up
    fs, prefix = fsspec.core.url_to_fs(root)
    return {name: hashlib.sha256(fs.cat_file(name)).hexdigest() for name in fs.find(prefix)}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: a gs:// command must leave it empty (no `gs:` folder)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "cwd"


def test_every_command_on_a_bucket(bucket, cwd, tmp_path, capsys):
    """train, eval, generate, export (to the bucket and to a local folder), import and
    checkpoint.load_params_from, all from gs://; they agree with each other and with the
    local export byte for byte."""
    run = f"{bucket}/run"
    assert cli.main(["train", "--run-dir", run, *FIRST]) == 0
    assert {p.name for p in as_path(run).iterdir()} >= {
        "config.yaml", "tokenizer.model", "metrics.jsonl", "tensorboard", "checkpoints"}
    assert list((as_path(run) / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4]
    capsys.readouterr()

    assert cli.main(["eval", "--run-dir", run]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    logged = next(r for r in rows(run) if "eval_loss" in r)
    assert evaluated["step"] == 4 and evaluated["eval_loss"] == pytest.approx(
        logged["eval_loss"], rel=1e-6)

    assert cli.main(["generate", "--run-dir", run, "--prompt", "def ", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("def ")

    assert cli.main(["export", "--run-dir", run, "--out", f"{bucket}/hf"]) == 0
    assert cli.main(["export", "--run-dir", run, "--out", str(tmp_path / "hf")]) == 0
    local = sorted(os.listdir(tmp_path / "hf"))
    assert sorted(p.name for p in as_path(f"{bucket}/hf").iterdir()) == local
    for name in local:
        assert (as_path(f"{bucket}/hf") / name).read_bytes() == (tmp_path / "hf" / name
                                                                 ).read_bytes(), name

    assert cli.main(["import", "--hf", f"{bucket}/hf", "--run-dir", f"{bucket}/imported"]) == 0
    imported = RunDir(f"{bucket}/imported").load_config()
    assert imported.checkpoint.load_params_from == f"{bucket}/imported/imported"

    # The imported weights, and a new run's start from the gs:// run, are the run's own.
    cfg = RunDir(run).load_config()
    trainer = train.build_trainer(cfg, train.sharding.make_mesh(cfg.mesh))
    starting = [train.build_trainer(load_config(SMOKE, [f"checkpoint.load_params_from={s}"]),
                                    trainer.mesh)
                for s in (run, imported.checkpoint.load_params_from)]
    with jax.set_mesh(trainer.mesh), contextlib.closing(
            Checkpointer(RunDir(run), read_only=True)) as checkpointer:
        final, _ = checkpointer.restore(4, train.abstract_state(trainer),
                                        trainer.state_shardings, data=False)
        for start in starting:
            state, first = loop.restore_or_init(start, None, None, {},
                                                 MetricsWriter(None, 1, echo=False))
            assert first == 0
            for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(final["params"])):
                np.testing.assert_array_equal(a, b)
    assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(REPO, "gs:"))


def test_prepare_into_a_bucket_then_train_from_it(bucket, cwd, tmp_path, capsys):
    """`prepare --out gs://` and `tokenizer train --data gs://` give the dataset and
    tokenizer a local prepare gives (same batches), and training reads it from the bucket."""
    inputs = os.path.join(REPO, "maxgpt")
    prepare = ["prepare", inputs, "--text-suffix", ".py", "--validation-fraction", "0.2"]
    assert cli.main([*prepare, "--out", f"{bucket}/data"]) == 0
    assert cli.main([*prepare, "--out", str(tmp_path / "data")]) == 0
    tokenize = ["tokenizer", "train", "--vocab-size", "512"]
    assert cli.main([*tokenize, "--data", f"{bucket}/data"]) == 0
    assert cli.main([*tokenize, "--data", str(tmp_path / "data")]) == 0
    remote, here = (load_config(SMOKE, [f"data.source={d}", "model.vocab_size=512"])
                    for d in (f"{bucket}/data", str(tmp_path / "data")))
    assert resolve_corpus(remote).tokenizer.fingerprint == resolve_corpus(
        here).tokenizer.fingerprint
    for split in ("train", "validation"):
        a, b = (next(batches(resolve_corpus(c), split, seq_len=64, batch_size=4,
                             seed=0 if split == "train" else None)) for c in (remote, here))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    capsys.readouterr()
    assert cli.main(["train", "--config", SMOKE, "--run-dir", f"{bucket}/run",
                     f"data.source={bucket}/data", "model.vocab_size=512", "train.steps=2",
                     "train.eval_every=2", "data.num_workers=0"]) == 0
    assert f"data {bucket}/data" in capsys.readouterr().err
    assert [r["step"] for r in rows(f"{bucket}/run")] == [1, 2, 2]  # two steps, one eval
    assert os.listdir(cwd) == []


def test_the_same_command_again_continues_and_a_changed_width_is_refused(bucket, cwd, capsys):
    """The restart path of every launcher: the first command, run again, resumes (and
    train.steps may grow); a change of the model is refused with one line, exit 2, and every
    object of the run is byte-identical afterwards."""
    run = f"{bucket}/run"
    first = ["train", "--run-dir", run, *FIRST]
    assert cli.main(first) == 0
    capsys.readouterr()
    assert cli.main(first) == 0  # done already: resumes at step 4 and trains nothing
    assert f"resumed from {run}/checkpoints/4" in capsys.readouterr().err
    assert cli.main([*first, "train.steps=6"]) == 0
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    before = tree_hashes(run)
    capsys.readouterr()
    assert cli.main([*first, "train.steps=6", "model.embed_dim=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maxgpt: error: ") and "model.embed_dim" in err[0]
    assert tree_hashes(run) == before

    # A live owner elsewhere (fresh heartbeat) keeps a second trainer off the bucket run.
    owner = as_path(run) / "owner.json"
    assert not owner.exists()  # each finished run removed its record
    owner.write_text(json.dumps({"host": "elsewhere", "pid": 7, "since": "then",
                                 "heartbeat": time.time(), "token": "t"}))
    before = tree_hashes(run)
    capsys.readouterr()
    assert cli.main([*first, "train.steps=8"]) == 2
    assert "host elsewhere, pid 7, since then" in capsys.readouterr().err
    assert tree_hashes(run) == before
    assert os.listdir(cwd) == []
