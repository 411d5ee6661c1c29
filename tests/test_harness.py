"""lm-eval tasks scored by maxgpt's own model (maxgpt/harness.py) against lm-eval's own `hf`
backend (HFLM) on the `maxgpt export` folder of the same checkpoint.

The tasks are local (tests/lm_eval_tasks: YAML + JSON lines, read offline; their data paths
are relative to the repository root, where these tests run). HFLM is given what training
fed the model, explicitly: `add_bos_token=True` for loglikelihood and generation (bos, then
the text), `add_bos_token=False` for rolling perplexity (its first window is conditioned on
the bos prefix token already), and `max_length` = train.seq_len.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxgpt import cli, loop
from maxgpt.config import ConfigError
from tests.conftest import REPO, make_config

torch = pytest.importorskip("torch", reason="the hf reference needs torch (CI installs the "
                            "CPU build)")
pytest.importorskip("lm_eval", reason="needs the [eval] extra")

CONTEXT = 64  # train.seq_len of the run below
INCLUDE = "tests/lm_eval_tasks"
TASKS = "maxgpt_tiny_mc,maxgpt_tiny_ppl"
BOS_FOR = {"maxgpt_tiny_mc": True, "maxgpt_tiny_ppl": False}  # HFLM's add_bos_token per task
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LONG = ("import os\nimport sys\n\n\ndef walk(root):\n    for dirpath, dirnames, filenames in "
        "os.walk(root):\n        for name in sorted(filenames):\n            yield os.path.join("
        "dirpath, name)\n\n\ndef main(argv):\n    for path in walk(argv[1]):\n        print("
        "path)\n    return 0\n\n\nif __name__ == '__main__':\n    sys.exit(main(")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps on the built-in corpus with both tasks scored after every
    step (eval.tasks_every=1), and its export: (run dir, export folder, history)."""
    tmp = tmp_path_factory.mktemp("harness")
    cfg = make_config("tiny", "data.source=builtin", "model.vocab_size=512", "train.steps=2",
                      "train.batch_size=8", f"train.seq_len={CONTEXT}", "train.eval_every=0",
                      "data.num_workers=0", f"eval.tasks={TASKS}", "eval.tasks_every=1",
                      f"eval.include_path={INCLUDE}")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        _, history = loop.run(cfg, tmp / "run", echo=False)
    assert cli.main(["export", "--run-dir", str(tmp / "run"), "--out", str(tmp / "hf")]) == 0
    return tmp / "run", tmp / "hf", history


def hflm(folder, add_bos_token: bool):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4,
                max_length=CONTEXT, add_bos_token=add_bos_token)


@pytest.fixture(scope="module")
def reference(trained):
    """lm-eval's hf backend on the export: {task: {metric: value}}."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    _, folder, _ = trained
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setenv("DISABLE_MULTIPROC", "1")
        manager = TaskManager(include_path=INCLUDE, include_defaults=False)
        for task, bos in BOS_FOR.items():
            loaded = manager.load([task])
            loaded["tasks"][task].set_config(key="num_fewshot", value=0)
            out = evaluator.evaluate(lm=hflm(folder, bos), task_dict=loaded, bootstrap_iters=0,
                                     log_samples=False)["results"][task]
            results[task] = {k.split(",")[0]: v for k, v in out.items()
                             if k.endswith(",none") and "_stderr" not in k}
    assert set(results["maxgpt_tiny_mc"]) == {"acc", "acc_norm", "brier_score"}
    assert set(results["maxgpt_tiny_ppl"]) == {"word_perplexity", "byte_perplexity",
                                               "bits_per_byte"}
    return results


def assert_equal_to_hf(tasks: dict, reference: dict) -> float:
    """maxgpt's {task: {metric: value}} equals the reference to 1e-4 relative; returns the
    largest relative difference."""
    assert set(tasks) == set(reference)
    worst = 0.0
    for task, metrics in reference.items():
        assert set(tasks[task]) == set(metrics), task
        for name, value in metrics.items():
            np.testing.assert_allclose(tasks[task][name], value, rtol=1e-4,
                                       err_msg=f"{task}/{name}")
            worst = max(worst, abs(tasks[task][name] - value) / max(abs(value), 1e-12))
    print(f"largest relative difference from hf: {worst:.2e}")
    return worst


def task_rows(run_dir) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if any(k.startswith("eval_task/") for k in r)]


def as_tasks(row: dict) -> dict:
    tasks: dict = {}
    for key, value in row.items():
        if key.startswith("eval_task/"):
            task, metric = key[len("eval_task/"):].split("/", 1)
            tasks.setdefault(task, {})[metric] = value
    return tasks


def subprocess_env(tmp_path, devices: int) -> dict:
    env = {**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp_path / "hf-home"),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("MAXGPT_COORDINATOR", None)
    return env


def summary_line(stdout: str, prefix: str = "") -> dict:
    """The one JSON line on stdout, whatever the harness prints (gloo, which connects
    processes, prints to stdout itself: with a prefix, only the JSON lines count)."""
    lines = [line[len(prefix):] for line in stdout.splitlines()
             if line.startswith(prefix + ("{" if prefix else ""))]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_tasks_every_writes_task_rows_during_training(trained, reference):
    run, _, history = trained
    rows = task_rows(run)
    assert [r["step"] for r in rows][:2] == [1, 2]
    assert [r for r in history if "eval_task/maxgpt_tiny_mc/acc" in r] == rows[:2]
    assert as_tasks(rows[0]) != as_tasks(rows[1])  # scored with each step's parameters
    for step in (1, 2):
        saved = json.loads((run / "eval" / f"tasks-step-{step}.json").read_text())
        assert saved["step"] == step and saved["tasks"] == TASKS.split(",")
        assert saved["results"]["maxgpt_tiny_ppl"]["bits_per_byte,none"] == (
            rows[step - 1]["eval_task/maxgpt_tiny_ppl/bits_per_byte"])
    assert_equal_to_hf(as_tasks(rows[1]), reference)  # the final parameters = the export's
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").iterdir())
    assert b"eval/task/maxgpt_tiny_mc/brier_score" in events


def test_eval_tasks_on_a_2x2x2_mesh_equals_hf(trained, reference, capsys, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(REPO)
    before = len(task_rows(run))
    assert cli.main(["eval", "--run-dir", str(run), "--tasks", TASKS, "mesh.data=2",
                     "mesh.fsdp=2", "mesh.tensor=2"]) == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary["step"] == 2 and summary["results"] == str(run / "eval/tasks-step-2.json")
    assert_equal_to_hf(summary["tasks"], reference)
    rows = task_rows(run)
    assert len(rows) == before + 1 and as_tasks(rows[-1]) == summary["tasks"]


def test_eval_tasks_on_one_device_equals_hf(trained, reference, tmp_path):
    run, _, _ = trained
    done = subprocess.run([sys.executable, "-m", "maxgpt", "eval", "--run-dir", str(run),
                           "--tasks", TASKS], cwd=REPO, env=subprocess_env(tmp_path, 1),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_equal_to_hf(summary_line(done.stdout)["tasks"], reference)


def test_eval_tasks_with_two_processes_equals_hf(trained, reference, tmp_path):
    """Process 0 drives the harness, both score on one data=2 x fsdp=2 x tensor=2 mesh of
    2 processes x 4 devices (generation too); only process 0 prints and writes."""
    run, _, _ = trained
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "local.py"), "--processes", "2",
         "--devices-per-process", "4", "--", sys.executable, "-m", "maxgpt", "eval",
         "--run-dir", str(run), "--tasks", f"{TASKS},maxgpt_tiny_gen", "mesh.data=2",
         "mesh.fsdp=2", "mesh.tensor=2"], cwd=REPO, env=subprocess_env(tmp_path, 4),
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("[1] {")]
    tasks = summary_line(done.stdout, "[0] ")["tasks"]
    assert set(tasks.pop("maxgpt_tiny_gen")) == {"exact_match"}
    assert_equal_to_hf(tasks, reference)


def test_requests_equal_hf_one_by_one(trained, monkeypatch):
    """Each request kind through the adapter against HFLM's own method: left-truncated
    contexts, an empty context, multi-window perplexity, generation cut at `until`; the
    logits taken 16 positions at a time (train.loss_chunk, the default on TPU and GPU)."""
    from lm_eval.api.instance import Instance

    from maxgpt.inference import load_for_inference
    from maxgpt.lm_adapter import MaxgptLM
    from maxgpt.scoring import Scorer

    run, folder, _ = trained
    monkeypatch.chdir(REPO)
    trainer, params, corpus, _ = load_for_inference(
        run, overrides=["mesh.data=4", "mesh.tensor=2", "train.loss_chunk=16"])
    ours = MaxgptLM(Scorer(trainer, params, batch_size=3), corpus.tokenizer)

    def requests(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    pairs = [("def f(x):\n    return", " x + 1"), ("", "import os"), (LONG, "sys.argv))"),
             ("for i in range(10): ", "print(i)"), (LONG + LONG, " 0")]
    assert len(corpus.tokenizer.encode(LONG + LONG)) > CONTEXT  # the left cut is exercised
    theirs = hflm(folder, True)
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = theirs.loglikelihood(requests("loglikelihood", pairs))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    worst = max(abs(g[0] - w[0]) / abs(w[0]) for g, w in zip(got, want))

    generations = [("import os\nimport", {"until": ["\n"], "max_gen_toks": 8}),
                   (LONG, {"until": [")", "\n"], "max_gen_toks": 6, "do_sample": False}),
                   ("def main():\n", {"until": ["return"], "max_gen_toks": 12})]
    # The run's text is what its sentencepiece model decodes: tokenizer.json's byte-fallback
    # decoder gives one U+FFFD per byte of an invalid UTF-8 run, valid bytes included, which
    # an untrained model's byte pieces often make. HF's tokens, decoded as maxgpt decodes:
    hf_decode = theirs.tok_decode
    monkeypatch.setattr(theirs, "tok_decode", lambda tokens, **kw: hf_decode(tokens, **kw)
                        if isinstance(tokens, int) else corpus.tokenizer.decode(tokens))
    assert ours.generate_until(requests("generate_until", generations)) == (
        theirs.generate_until(requests("generate_until", generations)))

    texts = [("x = 1",), (LONG * 3,), ("",)]
    assert len(corpus.tokenizer.encode(LONG * 3)) > 2 * CONTEXT  # three windows or more
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    want = hflm(folder, False).loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    worst = max([worst] + [abs(g - w) / abs(w) for g, w in zip(got, want) if w])
    print(f"largest relative difference from hf, per request: {worst:.2e}")


def test_refusals(trained, capsys, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(REPO)

    def refused(*argv) -> str:
        assert cli.main(["eval", "--run-dir", str(run), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("maxgpt: error: "), err
        return err[0]

    assert "close matches: maxgpt_tiny_mc" in refused("--tasks", "maxgpt_tiny_mcq")
    assert "is not a folder" in refused("--tasks", "x", "eval.include_path=no/such/folder")
    assert "eval.batch_size must be at least 1" in refused("--tasks", "maxgpt_tiny_mc",
                                                            "eval.batch_size=0")
    with monkeypatch.context() as mp:  # lm-eval not installed
        for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
            mp.setitem(sys.modules, name, None)
        mp.setitem(sys.modules, "lm_eval", None)
        assert "pip install -e '.[eval]'" in refused("--tasks", "maxgpt_tiny_mc")
    with pytest.raises(ConfigError, match="synthetic"):
        loop.run(make_config("tiny", "train.steps=1", "eval.tasks=maxgpt_tiny_mc"), echo=False)


def test_a_task_folder_in_a_bucket_is_refused_in_one_line(trained, capsys):
    """lm-eval globs task YAMLs on local disk: a gs:// folder would look empty and every
    task 'unknown'; it is refused naming the reason instead."""
    run, _, _ = trained
    assert cli.main(["eval", "--run-dir", str(run), "--tasks", "maxgpt_tiny_mc",
                     "eval.include_path=gs://bucket/tasks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "local disk only" in err[0], err
