"""Every bad input gets one line, exit code 2, no traceback, and loses nothing.

One table of full `maxgpt ...` command lines, each run in-process against one small trained
run directory (made once for the module) and a set of broken files from outside (datasets,
Hugging Face folders, YAML, a tokenizer), each made here. For every row: exit code 2, one
line on stderr starting `maxgpt: error:` that says what is wrong, no traceback, and every
file of the run directory byte-identical afterwards (docs/configuration.md, Errors).
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from maxgpt import cli
from maxgpt.data.prepare import prepare
from maxgpt.export import read_folder
from maxgpt.generate import choose
from tests.conftest import REPO

SMOKE = os.path.join(REPO, "configs", "experiments", "smoke.yaml")
TRAIN = ["train", "--run-dir", "{run}"]  # the module's run: every refusal must leave it as is
FRESH = ["train", "--config", SMOKE, "--run-dir", "{fresh}", "train.steps=2",
         "train.eval_every=0", "data.num_workers=0"]  # a new run (its data is what is bad)
GENERATE = ["generate", "--run-dir", "{run}", "--prompt", "hi"]
GPT2 = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": 64,
        "n_layer": 2, "n_head": 4}

# (id, argv with {run}/{root}/{fresh} filled in, what the one line must say)
CASES = [
    # config keys and values
    ("key-in-other-section", TRAIN + ["train.lr=0.1"], "did you mean 'optim.lr'?"),
    ("key-misspelt", TRAIN + ["train.step=3"], "did you mean 'train.steps'?"),
    ("section-misspelt", TRAIN + ["trainer.steps=3"], "did you mean 'train.steps'?"),
    ("key-without-name", TRAIN + ["train.=3"], "unknown config key 'train.'"),
    ("override-without-section", TRAIN + ["steps=3"], "must look like section.key=value"),
    ("int-not-a-number", TRAIN + ["train.steps=many"], "train.steps must be int, got 'many'"),
    ("bool-not-a-bool", TRAIN + ["model.use_bias=maybe"], "model.use_bias must be bool"),
    ("choice-unknown", TRAIN + ["model.norm=batchnorm"], "must be one of layernorm, rmsnorm"),
    ("lr-negative", TRAIN + ["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    ("lr-zero", TRAIN + ["optim.lr=0"], "optim.lr must be > 0"),
    ("lr-negative-new-run", FRESH + ["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    ("lr-nan", TRAIN + ["optim.lr=nan"], "optim.lr must be a finite number"),
    ("b1-one", TRAIN + ["optim.b1=1"], "optim.b1 must be in [0, 1)"),
    ("b2-above-one", TRAIN + ["optim.b2=1.5"], "optim.b2 must be in [0, 1)"),
    ("eps-zero", TRAIN + ["optim.eps=0"], "optim.eps must be > 0"),
    ("min-lr-ratio-above-one", TRAIN + ["optim.min_lr_ratio=2"],
     "optim.min_lr_ratio (final lr / peak lr) must be in [0, 1]"),
    ("weight-decay-negative", TRAIN + ["optim.weight_decay=-0.1"],
     "optim.weight_decay must be >= 0"),
    ("clip-norm-negative", TRAIN + ["optim.clip_norm=-1"], "optim.clip_norm must be >= 0"),
    ("init-std-zero", TRAIN + ["model.init_std=0"], "model.init_std must be > 0"),
    ("seed-negative", TRAIN + ["train.seed=-1"], "train.seed must be in [0, 2**32)"),
    ("minutes-infinite", TRAIN + ["checkpoint.every_minutes=inf"], "must be a finite number"),
    ("steps-zero", TRAIN + ["train.steps=0"], "train.steps must be at least 1"),
    ("data-source-empty", TRAIN + ["data.source="], "data.source must be builtin"),
    ("mixture-weight-not-a-number", FRESH + ["data.source=mixture", "data.sources={{ds: x}}"],
     "data.sources weight of 'ds' must be a positive number, got 'x'"),
    ("mesh-too-small", TRAIN + ["mesh.data=3"], "has 3 devices but 8 are available"),
    ("stages-split-no-layers", TRAIN + ["mesh.stage=8", "mesh.data=1"],
     "2 layers do not split into mesh.stage=8 x mesh.pipeline_repeats=1 equal runs"),
    ("pipeline-microbatches-too-few", TRAIN + ["mesh.stage=2", "mesh.pipeline_microbatches=1"],
     "mesh.pipeline_microbatches=1 must be at least mesh.stage=2"),
    ("pipeline-batch-indivisible", TRAIN + ["mesh.stage=2", "mesh.pipeline_microbatches=3"],
     "do not split into 3 pipeline microbatches over 4 data shards"),
    ("pipeline-repeats-zero", TRAIN + ["mesh.pipeline_repeats=0"],
     "mesh.pipeline_repeats must be at least 1"),
    ("context-sequence-indivisible", FRESH + ["mesh.context=8", "mesh.data=1",
                                              "train.seq_len=40"],
     "train.seq_len=40 must be a multiple of 16 to split over 8 context-parallel devices"),
    ("context-loss-chunk", FRESH + ["mesh.context=2", "train.loss_chunk=64"],
     "train.loss_chunk=64 must divide the 32 positions each of the 2 context-parallel"),
    ("run-defining-key-changed", TRAIN + ["model.num_layers=3"],
     "holds a run with model.num_layers=2"),
    ("steps-below-the-run", TRAIN + ["train.steps=1"], "is at step 2, past train.steps=1"),
    # command lines
    ("flag-unknown", TRAIN + ["--steps", "3"], "unrecognized arguments: --steps"),
    ("command-misspelt", ["trian"], "invalid choice: 'trian'"),
    ("flag-without-value", ["train", "--run-dir"], "argument --run-dir: expected one argument"),
    ("required-flag-missing", ["generate", "--run-dir", "{run}"], "required: --prompt"),
    # config files
    ("config-missing", ["train", "--config", "{root}/nowhere.yaml", "--run-dir", "{fresh}"],
     "config file not found"),
    ("config-not-yaml", ["train", "--config", "{root}/broken.yaml", "--run-dir", "{fresh}"],
     "is not valid YAML (line 2)"),
    ("config-a-list", ["train", "--config", "{root}/list.yaml", "--run-dir", "{fresh}"],
     "must hold a mapping of sections"),
    ("config-a-directory", ["train", "--config", "{root}", "--run-dir", "{fresh}"],
     "is a directory, not a YAML config file"),
    ("config-value-a-date", ["train", "--config", "{root}/date.yaml", "--run-dir", "{fresh}"],
     "train.steps must be int, got '2024-01-01'"),
    ("preset-unknown", ["train", "--config", "{root}/preset.yaml", "--run-dir", "{fresh}"],
     "unknown model preset 'tinyy'; did you mean 'tiny'?"),
    # data and tokenizer files
    ("tokenizer-not-sentencepiece", FRESH + ["data.tokenizer={root}/random.model"],
     "random.model is not a sentencepiece model"),
    ("dataset-missing", FRESH + ["data.source={root}/nowhere"], "dataset directory not found"),
    ("dataset-summary-not-json", FRESH + ["data.source={root}/ds-summary"],
     "ds-summary/summary.json is damaged (not JSON)"),
    ("shard-empty", FRESH + ["data.source={root}/ds-empty"],
     "ds-empty/train-00000.array_record is empty (0 bytes)"),
    ("shard-random-bytes", FRESH + ["data.source={root}/ds-random"],
     "ds-random/train-00000.array_record is damaged: not a readable ArrayRecord file"),
    ("shard-missing", ["tokenizer", "train", "--data", "{root}/ds-missing", "--out",
                       "{fresh}.model"], "ds-missing/train-00000.array_record is missing"),
    ("shard-damaged-inside", ["tokenizer", "train", "--data", "{root}/ds-inside", "--out",
                              "{fresh}.model", "--vocab-size", "300"],
     "ds-inside/train-00000.array_record is damaged at record"),
    ("tokenizer-over-the-runs", ["tokenizer", "train", "--data", "{root}/ds",
                                 "--out", "{run}/tokenizer.model"], "already exists"),
    ("tokenizer-sample-zero", ["tokenizer", "train", "--data", "{root}/ds", "--out",
                               "{fresh}.model", "--sample-mb", "0"], "--sample-mb must be"),
    # generate
    ("max-new-tokens-zero", GENERATE + ["--max-new-tokens", "0"],
     "--max-new-tokens must be at least 1, got 0"),
    ("max-new-tokens-negative", GENERATE + ["--max-new-tokens", "-5"],
     "--max-new-tokens must be at least 1"),
    ("temperature-negative", GENERATE + ["--temperature", "-1"], "--temperature must be >= 0"),
    ("temperature-nan", GENERATE + ["--temperature", "nan"], "--temperature must be >= 0"),
    ("top-p-zero", GENERATE + ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ("top-p-above-one", GENERATE + ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("top-k-negative", GENERATE + ["--top-k", "-1"], "--top-k must be >= 0"),
    ("top-k-not-int", GENERATE + ["--top-k", "1.5"], "invalid int value: '1.5'"),
    ("generate-no-run", ["generate", "--run-dir", "{root}/nowhere", "--prompt", "hi"],
     "is not a run directory"),
    ("generate-step-absent", GENERATE + ["--step", "7"], "no checkpoint of step 7"),
    # eval, export, import
    ("eval-step-absent", ["eval", "--run-dir", "{run}", "--step", "99"],
     "no checkpoint of step 99"),
    ("export-over-the-run", ["export", "--run-dir", "{run}", "--out", "{run}"],
     "exists and is not empty"),
    ("safetensors-garbage", ["import", "--hf", "{root}/hf-garbage", "--run-dir", "{fresh}"],
     "hf-garbage/model.safetensors is not a readable safetensors file"),
    ("hf-config-not-json", ["import", "--hf", "{root}/hf-json", "--run-dir", "{fresh}"],
     "hf-json/config.json is not valid JSON"),
    ("hf-config-a-list", ["import", "--hf", "{root}/hf-list", "--run-dir", "{fresh}"],
     "must hold a JSON object"),
    ("hf-index-not-json", ["import", "--hf", "{root}/hf-index", "--run-dir", "{fresh}"],
     "model.safetensors.index.json is not valid JSON"),
    ("hf-weights-missing", ["import", "--hf", "{root}/hf-noweights", "--run-dir", "{fresh}"],
     "model.safetensors is missing"),
    ("import-over-the-run", ["import", "--hf", "{root}/hf-garbage", "--run-dir", "{run}"],
     "already holds a run"),
    # prepare, params, plan
    ("prepare-input-missing", ["prepare", "{root}/nowhere", "--out", "{fresh}"],
     "input not found"),
    ("prepare-over-the-run", ["prepare", "{root}/text", "--out", "{run}"],
     "already exists and is not empty"),
    ("prepare-shard-size-zero", ["prepare", "{root}/text", "--out", "{fresh}", "--shard-mb",
                                 "0"], "--shard-mb must be a positive size"),
    ("prepare-all-validation", ["prepare", "{root}/text", "--out", "{fresh}",
                                "--validation-fraction", "1"], "must be in [0, 1)"),
    ("params-seq-len-negative", ["params", "--seq-len", "-1"], "--seq-len must be at least 1"),
    ("plan-flops-infinite", ["plan", "--flops", "inf"], "--flops must be a positive number"),
]

# Shards are opened with the first batch: these runs have logged their start (stderr) first.
STARTED = {"shard-empty", "shard-random-bytes"}


def _digest(directory) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), directory):
            hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(directory) for f in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-step run, its files' hashes, and the broken inputs of the table."""
    root = tmp_path_factory.mktemp("errors")
    run = root / "run"
    assert cli.main(["train", "--config", SMOKE, "--run-dir", str(run), "train.steps=2",
                     "train.eval_every=0", "data.num_workers=0"]) == 0
    (root / "broken.yaml").write_text("train: {steps: [\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "date.yaml").write_text("train: {steps: 2024-01-01}\n")
    (root / "preset.yaml").write_text("preset: tinyy\n")
    (root / "random.model").write_bytes(os.urandom(300))

    (root / "text").mkdir()
    for i in range(40):
        (root / "text" / f"{i}.txt").write_text(f"document {i}: " + "some words here " * 40)
    prepare([root / "text"], root / "ds", validation_fraction=0.1, progress=False)
    shutil.copy(run / "tokenizer.model", root / "ds" / "tokenizer.model")
    shard = "train-00000.array_record"
    for name in ("summary", "empty", "random", "missing", "inside"):
        shutil.copytree(root / "ds", root / f"ds-{name}")
    (root / "ds-summary" / "summary.json").write_text("{not json")
    (root / "ds-empty" / shard).write_bytes(b"")
    (root / "ds-random" / shard).write_bytes(os.urandom(5000))
    (root / "ds-missing" / shard).unlink()
    data = (root / "ds" / shard).read_bytes()  # zeros past the header: found when read
    (root / "ds-inside" / shard).write_bytes(data[:100] + bytes(1000) + data[1100:])

    folders = {"hf-garbage": ("model.safetensors", os.urandom(1000)),
               "hf-json": ("config.json", b"{not json"), "hf-list": ("config.json", b"[1]"),
               "hf-index": ("model.safetensors.index.json", b"{oops"),
               "hf-noweights": (None, None)}
    for folder, (name, content) in folders.items():
        (root / folder).mkdir()
        (root / folder / "config.json").write_text(json.dumps(GPT2))
        if name:
            (root / folder / name).write_bytes(content)
    return {"root": root, "run": run, "digest": _digest(run)}


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world, argv, message, capsys,
                                                        monkeypatch, request):
    monkeypatch.chdir(world["root"])  # nothing a command makes by default lands in the repo
    fresh = world["root"] / "fresh" / request.node.callspec.id
    argv = [a.format(run=world["run"], root=world["root"], fresh=fresh) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("maxgpt: error: ")]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0] and err.endswith("\n"), err
    assert message in errors[0], err
    assert "Traceback" not in err and " object at 0x" not in err and "<bound " not in err
    if request.node.callspec.id not in STARTED:
        assert len(lines) == 1, err  # refused before anything started: that line alone
    assert _digest(world["run"]) == world["digest"]


def test_a_real_process_prints_the_one_line(world):
    """What a terminal shows: no log lines of the libraries around the error, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "maxgpt", "train", "--run-dir",
                           str(world["run"]), "train.steps=1"],
                          cwd=world["root"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (f"maxgpt: error: {world['run']} is at step 2, past train.steps=1: "
                           "a run cannot go back; continue it with train.steps above 2, or "
                           "read an earlier checkpoint with --step (eval, generate, export) "
                           "(nothing was changed)\n")
    assert _digest(world["run"]) == world["digest"]


def test_a_top_k_past_the_vocabulary_cuts_nothing():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    key = jax.random.key(3)
    picks = [choose(logits, key, temperature=1.0, top_k=k, top_p=1.0, allow_eos=True)
             for k in (0, 4, 100)]
    assert picks[0] == picks[1] == picks[2]


def test_bfloat16_safetensors_are_read(tmp_path):
    """Most hub checkpoints store bfloat16, which safetensors' numpy loader does not know."""
    weight = np.array([[1.5, -2.0], [3.25, 0.0]], ml_dtypes.bfloat16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2],
                               "data_offsets": [0, weight.nbytes]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(  # the format: u64 length, JSON, bytes
        struct.pack("<Q", len(header)) + header + weight.tobytes())
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    config, state = read_folder(tmp_path)
    assert config == GPT2
    np.testing.assert_array_equal(np.asarray(state["w"], np.float32),
                                  [[1.5, -2.0], [3.25, 0.0]])


def test_a_storage_error_keeps_its_cause_in_one_line():
    """tensorstore's errors can be kilobytes on one line and name the cause only by errno at
    the very end: the line is cut in the middle and the errno spelled out."""
    from maxgpt.storage import one_line
    error = ValueError('PERMISSION_DENIED: Error opening "zarr" driver: Failed to open: '
                       f'"/run/checkpoints/10": {os.strerror(30)}' + " {spec}" * 200
                       + " [os_error_code='30']\nsecond line")
    line = one_line(error)
    assert "\n" not in line and len(line) < 300 and " ... " in line
    assert line.startswith("PERMISSION_DENIED") and line.endswith(f"({os.strerror(30)})")
    assert one_line(OSError(30, os.strerror(30))) == f"[Errno 30] {os.strerror(30)}"
