"""lm-evaluation-harness tasks scored in-process by maxgpt's own sharded model:
`maxgpt eval --tasks a,b` and `eval.tasks` every `eval.tasks_every` steps of training
(docs/evaluation.md).

- The harness (the `[eval]` extra) runs on process 0 only: it loads the tasks, builds the
  requests and computes the metrics. Every process scores (maxgpt/scoring.py: process 0
  broadcasts each batch, all run the same jitted step), so a checkpoint on a pod is
  evaluated on the pod, sharded as it trained, without an export. The other processes do
  not import lm_eval.
- Requests become tokens as training fed them (maxgpt/lm_adapter.py).
- Task names are checked when a `Tasks` is made (before a checkpoint is read, or before
  training starts): a name neither in `eval.include_path` nor among the harness's own
  tasks is refused with the close matches. Only the include path is indexed when it holds
  every task asked for (the harness's full index of ~15k tasks takes seconds to build).
- Results: RUN/eval/tasks-step-<N>.json (the harness's results, versions, n-shot and task
  configs), and a metrics row `{"step": N, "eval_task/<task>/<metric>": value, ...}` for
  metrics.jsonl and TensorBoard (`eval/task/<task>/<metric>`). A metric computed after a
  filter other than `none` is named `<metric>/<filter>`; standard errors stay in the JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import numbers
import os
import random
import sys
from typing import Any

import numpy as np

from maxgpt import distributed
from maxgpt.config import ConfigError, EvalConfig
from maxgpt.run_dir import RunDir
from maxgpt.scoring import Scorer
from maxgpt.storage import as_path, is_remote, one_line, write_atomic

ROW_PREFIX = "eval_task/"
INSTALL = "pip install -e '.[eval]'"
# Standard errors by bootstrap (the harness's perplexity metrics) resample in this process:
# 1,000 draws give a standard error to about 2%; the harness forks a pool of workers for
# them unless DISABLE_MULTIPROC is set, and a JAX process must not fork.
BOOTSTRAP_ITERS = 1000
SEEDS = {"random": 0, "numpy": 1234, "fewshot": 1234}  # the harness's own defaults


def task_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--tasks / eval.tasks needs at least one task name")
    return names


def _task_manager(names: list[str], include_path: str):
    """The harness's TaskManager that knows every name in `names` (lm_eval imported)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness: {INSTALL}") from None
    if include_path:
        if is_remote(include_path):  # the harness globs and reads its task files locally
            raise ConfigError(f"eval.include_path={include_path}: lm-eval reads task folders "
                              "from local disk only; copy the folder to each host (gsutil "
                              "cp -r) and give its local path")
        if not as_path(include_path).is_dir():
            raise ConfigError(f"eval.include_path={include_path} is not a folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ConfigError(f"unknown lm-eval task {name!r} ({hint}); `lm-eval ls tasks` lists "
                          "them, eval.include_path adds a folder of your own task YAMLs")
    return manager


def _metric_name(key: str) -> str | None:
    """`acc,none` -> `acc`; `exact_match,strict-match` -> `exact_match/strict-match`;
    None for standard errors and the harness's bookkeeping (`alias`, `samples`)."""
    if "," not in key or "_stderr," in key:
        return None
    metric, filter_ = key.split(",", 1)
    return metric if filter_ == "none" else f"{metric}/{filter_}"


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, anything else odd its text."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def training_tasks(cfg, corpus, run_dir: RunDir | None) -> "Tasks | None":
    """`eval.tasks` of a training run, checked before it trains; None when there are none."""
    if not cfg.eval.tasks:
        return None
    if corpus is None:
        raise ConfigError("eval.tasks needs a model of text: this run trains on synthetic "
                          "data (no tokenizer); set data.source or eval.tasks=''")
    return Tasks(cfg.eval, run_dir)


class Tasks:
    """lm-eval tasks to score a model on: checked when made, scored by `score` (which every
    process calls)."""

    def __init__(self, eval_cfg: EvalConfig, run_dir: RunDir | None = None,
                 names: str | None = None, kv_cache: str = "model"):
        """`kv_cache`: the generation tasks' decoder cache (`maxgpt.generate`)."""
        self.cfg, self.run_dir, self.kv_cache = eval_cfg, run_dir, kv_cache
        self.names = task_names(eval_cfg.tasks if names is None else names)
        for key, least in (("batch_size", 1), ("limit", 0), ("tasks_every", 0)):
            if getattr(eval_cfg, key) < least:
                raise ConfigError(f"eval.{key} must be at least {least}, got "
                                  f"{getattr(eval_cfg, key)}")
        self.manager, self.scorer = None, None
        error = ""
        if distributed.is_leader():
            try:
                self.manager = _task_manager(self.names, eval_cfg.include_path)
            except ConfigError as e:
                error = str(e)
        error = distributed.broadcast_text(error)  # every process stops with process 0
        if error:
            raise ConfigError(error)

    def results_file(self, step: int):
        return None if self.run_dir is None else self.run_dir.task_results(step)

    def score(self, trainer, params, tokenizer, step: int) -> dict[str, Any] | None:
        """Score the tasks with `params` (of `step`); on process 0 the metrics row (and the
        results written to the run directory), None on the others."""
        if self.scorer is None or self.scorer.trainer is not trainer:
            self.scorer = Scorer(trainer, params, self.cfg.batch_size, trainer.cfg.train.seed,
                                 self.kv_cache)
        self.scorer.params = params
        loaded, error = None, ""
        if distributed.is_leader():
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout: maxgpt's result line
                    loaded = self.manager.load(self.names)
            except Exception as e:  # a dataset that cannot be read, a broken task YAML
                error = (f"lm-eval could not load {', '.join(self.names)}: "
                         f"{type(e).__name__}: {one_line(e)}")
        error = distributed.broadcast_text(error)
        if error:
            raise ConfigError(error)
        if not distributed.is_leader():
            self.scorer.serve()
            return None
        failed = True
        try:
            results = self._evaluate(loaded, tokenizer)
            failed = False
        finally:
            self.scorer.close(failed)
        self._write(step, results)
        return self.row(step, results)

    def _evaluate(self, loaded, tokenizer) -> dict[str, Any]:
        from lm_eval import evaluator

        from maxgpt.lm_adapter import MaxgptLM

        random.seed(SEEDS["random"])
        np.random.seed(SEEDS["numpy"])
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=SEEDS["fewshot"])
        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # see BOOTSTRAP_ITERS
        with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress
            return evaluator.evaluate(lm=MaxgptLM(self.scorer, tokenizer),
                                      task_dict=loaded, limit=self.cfg.limit or None,
                                      bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)

    def _write(self, step: int, results: dict[str, Any]) -> None:
        path = self.results_file(step)
        if path is None:
            return
        record = {"step": step, "tasks": self.names, "limit": self.cfg.limit,
                  "batch_size": self.cfg.batch_size,
                  **{k: results.get(k) for k in ("results", "groups", "versions", "n-shot",
                                                 "n-samples", "higher_is_better", "configs")}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, (json.dumps(_finite(record), indent=1) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {one_line(e)}") from None

    @staticmethod
    def row(step: int, results: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        for task, values in results["results"].items():
            for key, value in values.items():
                name = _metric_name(key)
                if name is not None and isinstance(value, numbers.Real):
                    row[f"{ROW_PREFIX}{task}/{name}"] = value
        return row

    def summary(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as {"step", "tasks": {task: {metric: value}}, "results": file}."""
        tasks: dict[str, dict[str, Any]] = {}
        for key, value in row.items():
            if key.startswith(ROW_PREFIX):
                task, metric = key[len(ROW_PREFIX):].split("/", 1)
                tasks.setdefault(task, {})[metric] = value
        path = self.results_file(row["step"])
        return {"step": row["step"], "tasks": _finite(tasks),
                "results": None if path is None else os.fspath(path)}
