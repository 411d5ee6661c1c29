"""Loading a run's checkpoint for use rather than training: `maxgpt eval`, `maxgpt generate`
and `maxgpt export` start here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from maxgpt import checkpoint, sharding
from maxgpt import quantize as qz
from maxgpt.checkpoint import Checkpointer
from maxgpt.config import ConfigError
from maxgpt.data.pipeline import Corpus
from maxgpt.evaluate import evaluate
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike
from maxgpt.loop import open_corpus
from maxgpt.train import Trainer, abstract_model, abstract_state, build_trainer, eval_step


def load_for_inference(run_dir: PathLike | RunDir, step: int | None = None, overrides=(),
                       devices=None, quantize: tuple[str, int] | None = None
                       ) -> tuple[Trainer, Any, Corpus | None, int]:
    """A run's trainer (for its mesh and model), the parameters of a checkpoint (default: the
    newest) and its data; for `maxgpt eval`, `maxgpt generate` and `maxgpt export`.

    `quantize` (kind, group): the parameters with int8/int4 matmul weights (`weights_for`),
    and a trainer whose evaluation and scoring take them."""
    run_dir = RunDir(run_dir)
    cfg = run_dir.require_run().load_config(overrides)
    if quantize is not None:
        qz.check_weights(*quantize, cfg.model)  # before anything is read
    corpus = open_corpus(cfg, run_dir)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    with contextlib.closing(Checkpointer(run_dir, read_only=True)) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{run_dir} has no checkpoint")

        def restore():
            with jax.set_mesh(trainer.mesh):
                return checkpointer.restore(step, abstract_state(trainer),
                                            trainer.state_shardings, data=False)[0]["params"]

        if quantize is None:
            return trainer, restore(), corpus, step
        trainer, params = weights_for(trainer, run_dir.quantized(step, *quantize), restore,
                                      *quantize)
    return trainer, params, corpus, step


def weights_for(trainer: Trainer, folder, restore, kind: str, group: int) -> tuple[Trainer, Any]:
    """Quantized weights, read from `folder` if an earlier use saved them there, else made
    from `restore()` (the checkpoint's parameters) and saved there; and a view of the trainer
    for them: parameters in depth order, evaluation and lm-eval scoring compiled for their
    layout."""
    names, natural = trainer.param_names, trainer.param_shardings
    abstract = nnx.to_pure_dict(abstract_model(trainer.cfg)[1])  # outside the mesh: logical
    with jax.set_mesh(trainer.mesh):
        if folder.exists():
            target, shardings = qz.quantized_target(abstract, names, natural, kind, group)
            params = checkpoint.restore_tree(folder, target)
        else:
            params, shardings = qz.quantize_weights(trainer.natural_params(restore()), names,
                                                    natural, kind, group)
            checkpoint.save_tree(folder, params)
    evaluate = jax.jit(functools.partial(eval_step, graphdef=trainer.graphdef,
                                         loss_chunk=trainer.cfg.train.loss_chunk),
                       in_shardings=(shardings, trainer.batch_sharding),
                       out_shardings=sharding.replicated(trainer.mesh))
    return dataclasses.replace(trainer, schedule=None, param_shardings=shardings,
                               eval_fn=evaluate), params


def evaluate_checkpoint(run_dir: PathLike | RunDir, step: int | None = None, overrides=(),
                        devices=None, quantize: tuple[str, int] | None = None
                        ) -> dict[str, Any]:
    """`maxgpt eval`: held-out metrics of a run's checkpoint (default: the newest), with
    int8/int4 weights if `quantize` (kind, group)."""
    trainer, params, corpus, step = load_for_inference(run_dir, step, overrides, devices,
                                                       quantize)
    if corpus is None:
        raise ConfigError(f"{run_dir} trained on synthetic data: there is no held-out split")
    with jax.set_mesh(trainer.mesh):
        metrics = evaluate(trainer, params, corpus, corpus.tokenizer.byte_lengths())
    extra = {} if quantize is None else {"quantize": quantize[0], "quantize_group": quantize[1],
                                         "weight_bytes": qz.weight_bytes(params)}
    return {"step": step, **metrics, **extra}
