"""Loading a run's checkpoint for use rather than training: `maxgpt eval`, `maxgpt generate`
and `maxgpt export` start here."""

from __future__ import annotations

import contextlib
from typing import Any

import jax

from maxgpt import sharding
from maxgpt.checkpoint import Checkpointer
from maxgpt.config import ConfigError
from maxgpt.data.pipeline import Corpus
from maxgpt.evaluate import evaluate
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike
from maxgpt.loop import open_corpus
from maxgpt.train import Trainer, abstract_state, build_trainer


def load_for_inference(run_dir: PathLike | RunDir, step: int | None = None, overrides=(),
                       devices=None) -> tuple[Trainer, Any, Corpus | None, int]:
    """A run's trainer (for its mesh and model), the parameters of a checkpoint (default: the
    newest) and its data; for `maxgpt eval`, `maxgpt generate` and `maxgpt export`."""
    run_dir = RunDir(run_dir)
    cfg = run_dir.require_run().load_config(overrides)
    corpus = open_corpus(cfg, run_dir)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    with contextlib.closing(Checkpointer(run_dir, read_only=True)) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{run_dir} has no checkpoint")
        with jax.set_mesh(trainer.mesh):
            state, _ = checkpointer.restore(step, abstract_state(trainer),
                                            trainer.state_shardings, data=False)
    return trainer, state["params"], corpus, step


def evaluate_checkpoint(run_dir: PathLike | RunDir, step: int | None = None, overrides=(),
                        devices=None) -> dict[str, Any]:
    """`maxgpt eval`: held-out metrics of a run's checkpoint (default: the newest)."""
    trainer, params, corpus, step = load_for_inference(run_dir, step, overrides, devices)
    if corpus is None:
        raise ConfigError(f"{run_dir} trained on synthetic data: there is no held-out split")
    with jax.set_mesh(trainer.mesh):
        metrics = evaluate(trainer, params, corpus, corpus.tokenizer.byte_lengths())
    return {"step": step, **metrics}
