"""Training: abstract -> sharded initialisation, the pure train step, and the loop.

The train state crosses the jit boundary as a plain pytree,
`{"params": {...}, "opt_state": ..., "step": int32}`, with parameters as a pure nested dict
(`nnx.to_pure_dict`); the model is rebuilt inside the step with `nnx.merge(graphdef, params)`.
The step is jitted once with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx
from jax.sharding import Mesh

from maxgpt import sharding
from maxgpt.config import Config, ConfigError
from maxgpt.data import SyntheticSource
from maxgpt.flops import flops_per_token, peak_flops
from maxgpt.metrics import MetricsWriter
from maxgpt.model import Transformer
from maxgpt.optim import learning_rate, make_optimizer


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything about a run that is fixed once the config and mesh are known."""

    cfg: Config
    mesh: Mesh
    optimizer: optax.GradientTransformation
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Callable  # jitted (state, batch) -> (state, metrics)


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, with no memory allocated."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(cfg.train.seed))))


def count_params(cfg: Config) -> int:
    return sum(x.size for x in jax.tree.leaves(abstract_model(cfg)[1]))


def loss_fn(params, graphdef, batch, dropout_key, z_loss: float):
    """Summed token cross-entropy (and z-loss) over non-padding tokens, and the token count.

    Sums, not means, so that microbatches add up exactly to the full batch.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)  # segment 0 is padding
    nll = ((log_z - target_logit) * weights).sum()
    objective = nll + z_loss * (jnp.square(log_z) * weights).sum()
    return objective, (nll, weights.sum())


def train_step(state, batch, *, graphdef, optimizer, cfg: Config):
    """One optimizer step over the global batch, accumulated over `train.microbatches`."""
    M = cfg.train.microbatches
    params = state["params"]
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), state["step"])
    key = key if cfg.model.dropout > 0 else None

    # (B, T) -> (M, B/M, T) taking rows i*M + m for microbatch m: every device keeps its own
    # rows, so splitting the batch moves no data between devices.
    def split(x):
        x = x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch", "seq"))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
        grads, nll, tokens = carry
        index, mb = micro
        mb_key = None if key is None else jax.random.fold_in(key, index)
        (_, (mb_nll, mb_tokens)), mb_grads = grad_fn(params, graphdef, mb, mb_key,
                                                     cfg.train.z_loss)
        return (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, tokens + mb_tokens), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
    (grads, nll, tokens), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(M), jax.tree.map(split, batch)))
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)

    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": nll / tokens, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate(cfg)(state["step"]), "tokens": tokens}
    return new_state, metrics


def _check_batch(cfg: Config, mesh: Mesh) -> None:
    shards = sharding.data_shards(mesh)
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % shards:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} split into {cfg.train.microbatches} "
            f"microbatch(es) of {micro} does not divide over {shards} data shards "
            f"(mesh.data x mesh.fsdp); use a multiple of {shards * cfg.train.microbatches}")


def build_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    _check_batch(cfg, mesh)
    graphdef, abstract_params = abstract_model(cfg)
    optimizer = make_optimizer(cfg)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract_params))
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        lambda state, batch: train_step(state, batch, graphdef=graphdef,
                                        optimizer=optimizer, cfg=cfg),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)
    return Trainer(cfg, mesh, optimizer, state_sh, batch_sh, step)


def init_state(trainer: Trainer) -> dict[str, Any]:
    """Initialise parameters and optimizer state directly in their shards (no host copy)."""
    cfg, optimizer = trainer.cfg, trainer.optimizer

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(cfg.train.seed))))
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32)}

    with jax.set_mesh(trainer.mesh):
        return jax.jit(init, out_shardings=trainer.state_shardings)()


def _describe_compile(compiled, seconds: float) -> str:
    text = f"compiled train step in {seconds:.1f}s"
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2**30
        text += (f"; per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, "
                 f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB")
    return text


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    if (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; resuming arrives with checkpoints, so pick a new "
            "--run-dir (nothing was changed)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run(cfg: Config, run_dir: Path | None = None, devices=None,
        echo: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train for `train.steps` steps. Returns the final state and the logged metric rows."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = build_trainer(cfg, mesh)
    if run_dir is not None:
        prepare_run_dir(cfg, Path(run_dir))
    source = SyntheticSource(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len,
                             cfg.train.seed)
    writer = MetricsWriter(run_dir, cfg.train.steps, echo)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
    peak, peak_source = peak_flops(list(mesh.devices.flat))
    writer.info(f"maxgpt: {cfg.model.name}, {count_params(cfg):,} parameters, mesh "
                f"{dict(mesh.shape)}; mfu against {peak_source}")

    history = []
    with jax.set_mesh(mesh), contextlib.closing(writer):
        state = init_state(trainer)
        start = time.perf_counter()
        compiled = trainer.step_fn.lower(state, source.global_batch(0, trainer.batch_sharding)
                                         ).compile()
        writer.info(_describe_compile(compiled, time.perf_counter() - start))
        last_time, last_step = time.perf_counter(), 0
        for step in range(cfg.train.steps):
            state, metrics = compiled(state, source.global_batch(step, trainer.batch_sharding))
            done = step + 1
            if done % cfg.train.log_every and done != cfg.train.steps:
                continue
            metrics = jax.device_get(metrics)  # waits for the step: timing below is honest
            now = time.perf_counter()
            step_time = (now - last_time) / (done - last_step)
            row = {"step": done, "loss": metrics["loss"], "lr": metrics["lr"],
                   "grad_norm": metrics["grad_norm"],
                   "tokens_per_sec": tokens_per_step / step_time,
                   "step_time_s": step_time,
                   "mfu": None if peak is None else flops_per_step / step_time / peak,
                   "tokens_seen": done * tokens_per_step}  # positions, padding included
            writer.write(row)
            history.append(row)
            last_time, last_step = now, done
    return state, history
