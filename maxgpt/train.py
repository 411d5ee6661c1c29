"""Training: abstract -> sharded initialisation and the pure train step (the loop that
drives them is maxgpt/loop.py).

The train state crosses the jit boundary as a plain pytree,
`{"params": {...}, "opt_state": ..., "step", "skipped_steps", "bad_in_a_row": int32}`, with
parameters as a pure nested dict
(`nnx.to_pure_dict`); the model is rebuilt inside the step with `nnx.merge(graphdef, params)`.
The step is jitted once with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from maxgpt import pipeline, sharding
from maxgpt.config import Config, ConfigError
from maxgpt.data.pipeline import BATCH_KEYS
from maxgpt.loss import chunk_size, linear_cross_entropy, pieces, token_losses
from maxgpt.model import Transformer
from maxgpt.optim import learning_rate, make_optimizer


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything about a run that is fixed once the config and mesh are known."""

    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef  # the model's structure; parameters travel as pure dicts
    param_names: dict  # each parameter's logical axis names (sharding.param_names)
    schedule: pipeline.Schedule | None  # the pipeline's, with a stage axis
    optimizer: optax.GradientTransformation
    state_shardings: dict  # of the train state, its parameters as stored (pipeline.py)
    param_shardings: dict  # of the parameters in depth order (`natural_params`)
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Callable  # jitted (state, batch) -> (state, metrics)
    eval_fn: Callable  # jitted (params, batch + target_bytes) -> summed (nll, tokens, bytes)

    @functools.cached_property
    def batch_rows(self) -> tuple[int, ...]:
        """The rows of every batch this process feeds (sharding.batch_rows); only asked for
        when there is data to feed (not by an ahead-of-time compile)."""
        return sharding.batch_rows(self.batch_sharding, self.cfg.train.batch_size)

    @property
    def streams(self) -> int:
        """`data.streams`, or when 0, one stream per row share of this mesh."""
        return self.cfg.data.streams or self.cfg.train.batch_size // len(self.batch_rows)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (its `batch_rows`, ascending) -> the sharded global batch."""
        return sharding.global_batch(local, self.batch_sharding, self.cfg.train.batch_size)

    @property
    def repeats(self) -> int:
        return 1 if self.schedule is None else self.schedule.repeats

    def natural_params(self, params: dict) -> dict:
        """The train state's parameters as the model holds them (stacked layers in depth
        order, (L, ...)), for everything outside the train and eval steps: generation,
        lm-eval scoring, export. The same arrays unless a circular pipeline stores them
        as (repeats, L / repeats, ...) (maxgpt/pipeline.py)."""
        if self.repeats == 1:
            return params
        return jax.jit(functools.partial(pipeline.to_natural, names=self.param_names,
                                         repeats=self.repeats),
                       out_shardings=self.param_shardings)(params)


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, with no memory allocated."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(cfg.train.seed))))


def vocab_padding_params(cfg: Config) -> int:
    """Parameters in the padding rows of the embedding (and untied output) tables."""
    m = cfg.model
    return (m.padded_vocab_size - m.vocab_size) * m.embed_dim * (1 if m.tie_embeddings else 2)


def count_params(cfg: Config) -> int:
    """The model's parameters, vocabulary padding rows excluded (published counts exclude
    them; memory and FLOP figures include them)."""
    return sum(x.size for x in jax.tree.leaves(abstract_model(cfg)[1])) - vocab_padding_params(cfg)


def active_params(cfg: Config) -> int:
    """Parameters one token uses: all but the routed experts it does not go to (MoE); the
    router and shared experts count. Equal to count_params for a dense model."""
    m = cfg.model
    idle = sum(m.moe_layers()) * (m.num_experts - m.experts_per_token) * m.mlp_weights
    return count_params(cfg) - idle


def loss_fn(params, graphdef, batch, dropout_key, z_loss: float, moe_balance: float = 0.0,
            moe_z: float = 0.0, loss_chunk: int = 0, plan: pipeline.Schedule | None = None,
            names: dict | None = None):
    """Summed token cross-entropy (plus z-loss and, for MoE models, the routing losses) over
    non-padding tokens; aux (summed nll, token count, MoE routing stats or {}).

    Sums, not means, so that microbatches add up exactly to the full batch: the routing
    losses, means over tokens, enter weighted by the token count. The cross-entropy is taken
    `loss_chunk` positions at a time (maxgpt/loss.py). With a pipeline `plan` the layers run
    through its stages (params as stored; `names`: their logical axes). Under context
    parallelism the sequence is first put in the load-balanced order (a sum over tokens
    does not mind the order).
    """
    order = sharding.balanced_order(batch["inputs"].shape[1])
    if order is not None:
        batch = {k: sharding.constrain(jnp.take(v, order, axis=1), ("batch", "seq"))
                 for k, v in batch.items()}
    repeats = 1 if plan is None else plan.repeats
    model = nnx.merge(graphdef, pipeline.to_natural(params, names, repeats) if repeats > 1
                      else params)
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if plan is None:
        hidden, moe = model.hidden(*inputs, dropout_key, order)
    else:
        hidden, moe = pipeline.hidden(model, plan, params, *inputs, order, dropout_key)
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)  # segment 0 is padding
    output = model.output_weights()  # gathered once for all the loss's pieces
    chunk = chunk_size(loss_chunk, batch["targets"].shape[1])
    if model.output_quant == "none" and pieces(batch["targets"].shape[1], chunk) == 1:
        # the output layer's gradient computed with its loss (maxgpt/loss.py)
        objective, nll, _ = linear_cross_entropy(
            model.final_hidden(hidden), output, batch["targets"], weights, z_loss,
            model.vocab_size)
    else:
        nll, z_sum = token_losses(lambda h: model.logits(h, output), hidden,
                                  batch["targets"], weights, chunk)
        objective = nll + z_loss * z_sum
    if moe:
        objective += weights.sum() * (moe_balance * moe["balance_loss"] + moe_z * moe["z_loss"])
    return objective, (nll, weights.sum(), moe)


def all_finite(tree) -> jax.Array:
    """True when no leaf of `tree` holds inf or nan."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state, batch, *, graphdef, optimizer, cfg: Config,
               plan: pipeline.Schedule | None = None, names: dict | None = None):
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
        (_, (mb_nll, mb_tokens, moe)), mb_grads = grad_fn(
            params, graphdef, mb, mb_key, cfg.train.z_loss, cfg.train.moe_balance_loss,
            cfg.train.moe_z_loss, cfg.train.loss_chunk, plan, names)
        carry = (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, tokens + mb_tokens)
        return carry, moe

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
    (grads, nll, tokens), moe = jax.lax.scan(
        accumulate, zeros, (jnp.arange(M), jax.tree.map(split, batch)))
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)

    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    # Non-finite guard: a step whose loss or gradient is not finite is skipped (the state
    # keeps its old values, the step counter and the data move on), so parameters and
    # checkpoints never hold inf/nan. The run loop stops after train.max_bad_steps in a row.
    # A finite gradient norm means every squared gradient is finite, so AdamW's update is
    # too; deciding from the gradient alone, before the update, lets XLA update the state in
    # place (checking the new parameters as well held a second copy of them and of both
    # moments: 4.1 GiB per chip for llama3-8b on v5p-8).
    finite = jnp.isfinite(nll) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = {"params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + 1,
                 "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
                 "bad_in_a_row": jnp.where(finite, 0, state["bad_in_a_row"] + 1)}
    metrics = {"loss": nll / tokens, "grad_norm": grad_norm,
               "lr": learning_rate(cfg)(state["step"]), "tokens": tokens,
               "skipped_steps": new_state["skipped_steps"],
               "bad_in_a_row": new_state["bad_in_a_row"],
               # MoE routing, averaged over the microbatches (equal in size)
               **{f"moe_{name}": value.mean() for name, value in moe.items()}}
    return new_state, metrics


def eval_step(params, batch, *, graphdef, loss_chunk: int = 0,
              plan: pipeline.Schedule | None = None, names: dict | None = None):
    """Summed nll, token count and target UTF-8 bytes of one batch, no dropout."""
    _, (nll, tokens, _) = loss_fn(params, graphdef, batch, None, 0.0, loss_chunk=loss_chunk,
                                  plan=plan, names=names)
    return nll, tokens, jnp.where(batch["segment_ids"] > 0, batch["target_bytes"], 0).sum()


def _check_mesh(cfg: Config, mesh: Mesh, plan: pipeline.Schedule | None) -> None:
    experts, ep = cfg.model.num_experts, mesh.shape["expert"]
    if experts and experts % ep:  # mesh.expert=-1 resolves only here
        raise ConfigError(f"the expert axis has {ep} devices, which does not divide "
                          f"model.num_experts={experts}")
    shards = sharding.data_shards(mesh)
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % shards:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} split into {cfg.train.microbatches} "
            f"microbatch(es) of {micro} does not divide over {shards} data shards "
            f"(mesh.data x mesh.fsdp x mesh.expert); use a multiple of "
            f"{shards * cfg.train.microbatches}")
    pipeline.check(cfg, plan, shards)
    pieces = sharding.axis_size("seq", mesh)
    seq_len, chunk = cfg.train.seq_len, cfg.train.loss_chunk
    if pieces > 1 and seq_len % (2 * pieces):
        raise ConfigError(f"train.seq_len={seq_len} must be a multiple of {2 * pieces} to "
                          f"split over {pieces} context-parallel devices (two chunks each, "
                          "for causal load balance)")
    if pieces > 1 and chunk and (seq_len // pieces) % chunk:
        raise ConfigError(f"train.loss_chunk={chunk} must divide the {seq_len // pieces} "
                          f"positions each of the {pieces} context-parallel devices holds")
    if pieces > 1 and cfg.model.attention == "splash" and (seq_len // (2 * pieces)) % 128:
        raise ConfigError(f"model.attention=splash over {pieces} context-parallel devices "
                          f"needs train.seq_len to be a multiple of {256 * pieces} (chunks "
                          "of the kernel's 128-token tiles); use auto or xla")


def build_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    plan = pipeline.schedule(cfg, mesh)
    _check_mesh(cfg, mesh, plan)
    graphdef, abstract_params = abstract_model(cfg)
    optimizer = make_optimizer(cfg)
    names = sharding.param_names(abstract_params)
    natural = nnx.to_pure_dict(abstract_params)
    repeats = 1 if plan is None else plan.repeats
    stored = jax.eval_shape(functools.partial(pipeline.to_stored, names=names,
                                              repeats=repeats), natural)
    param_sh = sharding.param_shardings(pipeline.stored_names(names, repeats), stored, mesh)
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, stored)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated,
                "skipped_steps": replicated, "bad_in_a_row": replicated}
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg,
                          plan=plan, names=names),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, plan=plan, names=names,
                                         loss_chunk=cfg.train.loss_chunk),
                       in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    return Trainer(cfg, mesh, graphdef, names, plan, optimizer, state_sh,
                   sharding.param_shardings(names, natural, mesh), batch_sh, step, evaluate)


def _init_fn(trainer: Trainer) -> Callable[[], dict[str, Any]]:
    cfg, optimizer = trainer.cfg, trainer.optimizer

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(cfg.train.seed))))
        params = pipeline.to_stored(params, trainer.param_names, trainer.repeats)
        zero = jnp.zeros((), jnp.int32)
        return {"params": params, "opt_state": optimizer.init(params), "step": zero,
                "skipped_steps": zero, "bad_in_a_row": zero}

    return init


def init_state(trainer: Trainer) -> dict[str, Any]:
    """Initialise parameters and optimizer state directly in their shards (no host copy)."""
    with jax.set_mesh(trainer.mesh):
        return jax.jit(_init_fn(trainer), out_shardings=trainer.state_shardings)()


def abstract_state(trainer: Trainer) -> dict[str, Any]:
    """The train state's shapes and dtypes, nothing allocated: a restore target."""
    return jax.eval_shape(_init_fn(trainer))


def _abstract_batch(trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (trainer.cfg.train.batch_size, trainer.cfg.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)
            for k in BATCH_KEYS}
