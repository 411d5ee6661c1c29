"""Config loading, overrides and the errors users see (one line, exit code 2)."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maxgpt.cli import main
from maxgpt.config import ConfigError, load_config, valid_keys
from tests.conftest import REPO, make_config

SHIPPED = sorted(Path(REPO, "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_builds_abstractly(path):
    from maxgpt.train import abstract_model

    cfg = load_config(path)
    graphdef, params = abstract_model(cfg)  # shapes only: llama3-405b allocates nothing
    assert params["embed"].shape == (cfg.model.padded_vocab_size, cfg.model.embed_dim)
    padding = cfg.model.padded_vocab_size - cfg.model.vocab_size
    assert cfg.model.padded_vocab_size % 128 == 0 and 0 <= padding < 128
    assert params["blocks"]["attn"]["q_proj"].shape[0] == cfg.model.num_layers


def test_experiment_file_takes_preset_then_its_own_keys(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("preset: gpt2-small\ntrain: {steps: 7}\nmodel: {dropout: 0.1}\n")
    cfg = load_config(exp, ["optim.lr=1e-4", "model.use_bias=false"])
    assert (cfg.model.embed_dim, cfg.model.num_layers, cfg.model.vocab_size) == (768, 12, 50257)
    assert cfg.train.steps == 7 and cfg.model.dropout == 0.1
    assert cfg.optim.lr == 1e-4 and cfg.model.use_bias is False
    base = yaml.safe_load(Path(REPO, "configs/base.yaml").read_text())
    assert cfg.train.batch_size == base["train"]["batch_size"]  # untouched keys from base


def test_resolved_config_round_trips(tmp_path):
    cfg = make_config("tiny-gpt2", "train.steps=3", "mesh.fsdp=2")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def test_every_key_is_overridable():
    cfg = make_config()
    for key in valid_keys():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert load_config(None, [f"{key}={value}"]) is not None


@pytest.mark.parametrize("override, message", [
    (["train.step=5"], "unknown config key 'train.step'; did you mean 'train.steps'?"),
    (["modle.num_layers=2"],
     "unknown config key 'modle.num_layers'; did you mean 'model.num_layers'?"),
    (["train.steps=many"], "train.steps must be int, got 'many'"),
    (["train.steps=2.5"], "train.steps must be int"),
    (["model.use_bias=maybe"], "model.use_bias must be bool"),
    (["model.norm=batchnorm"], "model.norm must be one of layernorm, rmsnorm"),
    (["model.num_heads=3"], "model.num_heads=3 must divide model.embed_dim=64"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=4"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train.microbatches=3"], "train.microbatches=3 must divide train.batch_size=8"),
    (["data.streams=3"], "data.streams=3 must divide train.batch_size=8"),
    (["train.loss_chunk=100"], "train.loss_chunk=100 must divide train.seq_len=256"),
    (["model.unroll_layers=-2"], "model.unroll_layers must be -1 for all layers, 0 for auto"),
    (["train.profile_steps=3:2"], "must be A:B with 1 <= A <= B"),
    (["train.profile_steps=2"], "must be A:B with 1 <= A <= B"),
    (["model.attention=splash", "train.seq_len=200"],
     "model.attention=splash needs train.seq_len to be a multiple of 128"),
    (["steps=3"], "must look like section.key=value"),
    (["model.num_experts=4", "model.experts_per_token=5"],
     "model.experts_per_token must be between 1 and model.num_experts=4, got 5"),
    (["model.num_experts=4", "model.moe_every=3"],
     "model.moe_every=3 must be >= 1 and divide model.num_layers=2"),
    (["model.num_experts=4", "model.capacity_factor=0"], "model.capacity_factor must be > 0"),
    (["model.num_experts=6", "mesh.expert=4"], "mesh.expert=4 must divide model.num_experts=6"),
])
def test_bad_config_messages(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        make_config("tiny", *override)


@pytest.mark.parametrize("argv, message", [
    (["params", "--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["params", "--config", "configs/models/tiny.yaml", "train.step=1"],
     "did you mean 'train.steps'"),
    (["train", "--config", "configs/models/tiny.yaml", "mesh.data=3"],
     "mesh data=3 has 3 devices but 8 are available"),
    (["train", "--config", "configs/models/tiny.yaml", "mesh.fsdp=3"],
     "3 does not divide 8"),
    (["train", "--config", "configs/models/tiny.yaml", "mesh.data=8", "train.batch_size=4"],
     "does not divide over 8 data shards"),
    (["train", "--config", "configs/models/tiny.yaml", "mesh.data=-1", "mesh.fsdp=-1"],
     "at most one mesh axis may be -1"),
    (["train", "--config", "configs/models/tiny-moe.yaml", "mesh.data=1", "mesh.expert=-1"],
     "the expert axis has 8 devices, which does not divide model.num_experts=4"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(argv + ([] if argv[0] != "train" else ["--run-dir", str(tmp_path / "r")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxgpt: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r" / "config.yaml").exists()  # nothing written for a bad config


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "maxgpt", "params", "--config",
                           "configs/models/tiny.yaml", "model.num_heads=5"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "maxgpt: error: model.num_heads=5 must divide model.embed_dim=64\n"


def test_existing_run_dir_is_refused_and_left_intact(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("keep me")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--config", f"{REPO}/configs/models/tiny.yaml",
                 "--run-dir", str(run_dir)]) == 2  # its config.yaml cannot be compared with
    assert "config.yaml must hold a mapping of sections" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "keep me"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_train_command_end_to_end(tmp_path):
    """The user's path: a real process, the console entry point, the built-in corpus, a run
    directory with checkpoints, a held-out evaluation and a generated sample at the end."""
    proc = subprocess.run([sys.executable, "-m", "maxgpt", "train", "--config",
                           "configs/experiments/smoke.yaml", "--run-dir", str(tmp_path / "run"),
                           "train.steps=3", "train.log_every=1", "train.eval_every=2",
                           "train.eval_steps=2", "checkpoint.every=2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines[:5]] == [
        "step 1/3", "step 2/3", "eval 2/3", "step 3/3", "eval 3/3"]
    assert lines[5].startswith("--- sample: ") and lines[-1] == "---"
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in rows] == [
        (1, False), (2, False), (2, True), (3, False), (3, True)]
    assert load_config(tmp_path / "run/config.yaml").train.steps == 3
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["2", "3"]
    assert (tmp_path / "run/tokenizer.model").is_file()
    # the checkpoint carries config and tokenizer as plain JSON (docs/checkpoints.md)
    saved = json.loads((tmp_path / "run/checkpoints/3/tokenizer/metadata").read_text())
    assert base64.b64decode(saved["sentencepiece_model_base64"]) == (
        tmp_path / "run/tokenizer.model").read_bytes()
    saved_cfg = json.loads((tmp_path / "run/checkpoints/3/config/metadata").read_text())
    assert saved_cfg["train"]["steps"] == 3 and saved_cfg["model"]["vocab_size"] == 512

    # `maxgpt eval` on the newest checkpoint reproduces the run's last eval row
    proc = subprocess.run([sys.executable, "-m", "maxgpt", "eval", "--run-dir",
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout)
    assert evaluated["step"] == 3
    assert evaluated["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-6)
    assert evaluated["eval_bpb"] == pytest.approx(rows[-1]["eval_bpb"], rel=1e-6)

    # `maxgpt generate` continues two prompts, reproducibly for a seed
    command = [sys.executable, "-m", "maxgpt", "generate", "--run-dir", str(tmp_path / "run"),
               "--prompt", "def f(x):\n", "--prompt", "import", "--max-new-tokens", "8",
               "--seed", "1"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def f(x):\n") and "\nimport" in first.stdout
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert again.stdout == first.stdout
