"""Pipeline parallelism: the layer stack split into stages over the `stage` mesh axis.

The schedule is a loop inside the one jitted train step; the backward pass is its autodiff.
With S stages, M microbatches (`mesh.pipeline_microbatches`) and r repeats
(`mesh.pipeline_repeats`), the L layers are cut into S * r runs of L / (S r) consecutive
layers, and run v = i * S + s lives on stage s (circular placement, as in Narayanan et al.
2021 and MaxText; r = 1 is GPipe, Huang et al. 2019). Every step t of the loop, each stage
applies its run to one microbatch at once:

    stage s at step t works on item w = t - s: microbatch w mod M, repeat w // M
    (idle while w < 0 or w >= r M); its output moves to stage s + 1 (one collective permute
    of one microbatch's activations), and stage S-1's output goes back to stage 0 for the
    next repeat, or is the result after the last one.

A microbatch leaves stage S-1 at step i M + m + S - 1 and re-enters stage 0 at step
(i + 1) M + m, so M >= S is required; in between it waits in a buffer of the M microbatches
(which starts as the embedded inputs and ends as the output). The loop takes r M + S - 1
steps, each stage busy in r M of them: the bubble (idle fraction) is (S - 1) / (r M + S - 1).

The loop runs inside `jax.shard_map` over the stage axis alone (each device holds its
stage's layers; every other mesh axis stays automatic), so everything inside a layer (FSDP,
tensor, expert, context parallelism, MoE's shard_map) is unchanged.

Stacked-layer parameters are stored as (L, ...) in depth order, split over stages in
contiguous runs. A circular schedule needs stage s to hold the runs s, s + S, ... instead:
with r > 1 they are stored as (r, L / r, ...), the second axis split over the stages, which
is still depth order once flattened (`to_stored`); checkpoints restore across any r.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from maxgpt import sharding
from maxgpt.config import Config, ConfigError
from maxgpt.model.transformer import LAYER_INPUT, REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: int
    repeats: int
    microbatches: int

    @property
    def steps(self) -> int:
        """Steps of the pipeline loop."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of stage-steps spent idle, filling and draining the pipeline."""
        return (self.stages - 1) / self.steps

    def describe(self) -> str:
        kind = "GPipe" if self.repeats == 1 else f"circular, {self.repeats} repeats"
        return (f"pipeline {self.stages} stages ({kind}), {self.microbatches} microbatches, "
                f"bubble {self.bubble:.1%}")


def schedule(cfg: Config, mesh: Mesh) -> Schedule | None:
    """The run's pipeline schedule on `mesh`; None without a stage axis."""
    stages = sharding.axis_size("stages", mesh)
    if stages == 1:
        return None
    return Schedule(stages, cfg.mesh.pipeline_repeats,
                    cfg.mesh.pipeline_microbatches or stages)


def check(cfg: Config, plan: Schedule | None, batch_shards: int) -> None:
    """The user's error if the model or batch cannot be pipelined as asked."""
    if plan is None:
        return
    m = cfg.model
    layers = m.moe_layers()
    grouped = any(layers) and not all(layers)  # scanned in groups of moe_every layers
    groups = m.num_layers // (m.moe_every if grouped else 1)
    runs = plan.stages * plan.repeats
    if groups % runs:
        what = "layer groups (model.num_layers / model.moe_every)" if grouped else "layers"
        raise ConfigError(f"{groups} {what} do not split into mesh.stage={plan.stages} x "
                          f"mesh.pipeline_repeats={plan.repeats} equal runs; choose a stage "
                          f"count and repeats whose product divides {groups}")
    if plan.microbatches < plan.stages:
        raise ConfigError(f"mesh.pipeline_microbatches={plan.microbatches} must be at least "
                          f"mesh.stage={plan.stages} (a microbatch leaving the last stage "
                          "must find the first one free)")
    rows = cfg.train.batch_size // cfg.train.microbatches
    if rows % (plan.microbatches * batch_shards):
        raise ConfigError(
            f"{rows} sequences per step (train.batch_size / train.microbatches) do not split "
            f"into {plan.microbatches} pipeline microbatches over {batch_shards} data shards; "
            f"use a batch that is a multiple of {plan.microbatches * batch_shards}")


def _split(names: tuple, repeats: int) -> bool:
    """Whether a parameter of these logical axes is stored as (repeats, L / repeats, ...)."""
    return repeats > 1 and names[:1] == ("layers",)


def _is_names(x) -> bool:
    return isinstance(x, tuple)


def stored_names(names: dict, repeats: int) -> dict:
    """The logical axes of the parameters as stored: a stacked layer's gain `repeats`."""
    return jax.tree.map(lambda n: ("repeats", *n) if _split(n, repeats) else n, names,
                        is_leaf=_is_names)


def to_stored(params: dict, names: dict, repeats: int) -> dict:
    """Parameters in depth order -> as stored: (L, ...) -> (repeats, L / repeats, ...) for
    stacked layers under a circular schedule, a reshape."""
    return jax.tree.map(lambda x, n: x.reshape(repeats, -1, *x.shape[1:])
                        if _split(n, repeats) else x, params, names)


def to_natural(params: dict, names: dict, repeats: int) -> dict:
    """Stored parameters -> depth order (the inverse of `to_stored`), a reshape."""
    return jax.tree.map(lambda x, n: x.reshape(-1, *x.shape[2:])
                        if _split(n, repeats) else x, params, names)


def hidden(model, plan: Schedule, params: dict, tokens, positions, segment_ids, order,
           dropout_key):
    """`model.hidden` through the pipeline: the last block's output (B, T, D) and the MoE
    statistics averaged over layers and microbatches. `params`: the stored parameters, of
    which the stacked layers are used; `model` provides embeddings and the layers' code."""
    S, r, M = plan.stages, plan.repeats, plan.microbatches
    B, T = tokens.shape
    k_embed, k_layers = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x = model.embed_tokens(tokens, positions, k_embed)

    def by_stage(a):  # stored (L, ...) or (r, L / r, ...) -> (r, S, L / (r S), ...)
        return a.reshape(r, S, -1, *a.shape[2 if r > 1 else 1:])

    layers = {"stacks": [jax.tree.map(by_stage, params[name]) for name in model.stacks],
              "windows": by_stage(jnp.asarray(model.windows, jnp.int32))}
    if k_layers is not None:
        layers["keys"] = by_stage(jax.random.split(k_layers, len(model.windows)))

    def micro(a):  # (B, ...) -> (M, B / M, ...) taking rows i M + m: no data moves
        a = a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(a, (None, "batch", "seq", "embed")[:a.ndim])

    axes = sharding.mesh_axes("stages")
    run = functools.partial(_run_stage, model, plan, _stage_fn(model, plan, order), axes)
    by_device = P(None, axes)  # each device gets its stage's layers; the rest is replicated
    buffer, stats = jax.shard_map(
        run, in_specs=(jax.tree.map(lambda _: by_device, layers), P(), P(), P()),
        out_specs=(P(), P()), axis_names=set(axes), check_vma=False,
    )(layers, micro(x), micro(segment_ids), micro(positions))
    out = buffer.swapaxes(0, 1).reshape(B, T, -1)  # microbatch rows back in batch order
    return sharding.constrain(out, ("batch", "seq", "embed")), stats


def _stage_fn(model, plan: Schedule, order):
    """(layers of this stage, repeat, x, segment ids, positions, microbatch) -> one stage's
    run of layers on one microbatch, and its MoE statistics."""
    r = plan.repeats

    def stage(layers, rep, x, segment_ids, positions, m):
        # r == 1: a constant index, so the weights are loop-invariant and autodiff keeps
        # no copy of them per step of the loop
        rep = rep if r > 1 else 0
        weights = jax.tree.map(lambda a: a[rep], layers["stacks"])
        keys = layers.get("keys")
        if keys is not None:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, m))(keys[rep])
        return model.run_layers(x, segment_ids, positions, order, keys,
                                layers["windows"][rep], weights, remat=inner)

    # Each layer group keeps the model's remat policy. Under a circular schedule the weights
    # of a repeat are picked anew each step, and autodiff would keep them for every step:
    # a checkpoint around the stage recomputes the pick instead, keeping what the groups'
    # own policy needs: their inputs, and under `dots` the matmul outputs (`dots` also
    # stands in for no remat, which would save the picked weights; `dots_offload`'s
    # matmuls are recomputed once more).
    inner = model.remat
    if r > 1:
        inner = "dots" if inner == "none" else inner
        keep = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT)
        if inner == "dots":
            keep = jax.checkpoint_policies.save_from_both_policies(REMAT_POLICIES["dots"], keep)
        stage = jax.checkpoint(stage, policy=keep, prevent_cse=False)
    return stage


def _run_stage(model, plan: Schedule, stage, axes, layers, buffer, segments, positions):
    """The schedule on one device of the stage axis (inside shard_map): its stage's layers
    `layers` ((r, 1, L / (r S), ...) leaves), and the M microbatches' activations `buffer`
    (M, B / M, T, D), segment ids and positions (M, B / M, T). Returns the buffer of
    outputs (from stage 0, where they arrive, to every stage) and the MoE statistics."""
    S, r, M = plan.stages, plan.repeats, plan.microbatches
    s = jax.lax.axis_index(axes)  # this device's stage
    layers = jax.tree.map(lambda a: a[:, 0], layers)
    ring = [(i, (i + 1) % S) for i in range(S)]
    # Stage 0 keeps the buffer, turned by one place every step so that it is read and
    # written at fixed places: after step t, place p holds microbatch (p + t + 1) mod M.
    # Stage 0 reads place 0; the item arriving from the last stage, microbatch
    # (t - S + 1) mod M, goes to place M - S + 1 before the turn. (Indexing by t instead
    # made XLA:TPU gather the whole buffer over the data axes every step.)
    back = M - S + 1

    def step(carry, t):
        x, buffer = carry  # x: this stage's input at step t
        w = t - s  # this stage's item
        m = jnp.mod(w, M)
        out, stats = stage(layers, jnp.clip(w // M, 0, r - 1), x, segments[m], positions[m], m)
        arriving = jax.lax.ppermute(out, axes, ring)  # stage s - 1's output
        last = t - (S - 1)  # the item leaving the last stage (arriving at stage 0)
        keep = (s == 0) & (last >= 0) & (last < r * M)
        buffer = buffer.at[back].set(jnp.where(keep, arriving, buffer[back]))
        buffer = jnp.roll(buffer, -1, axis=0)
        x = jnp.where(s == 0, buffer[0], arriving)
        return (x, buffer), (stats, (w >= 0) & (w < r * M))

    (_, buffer), (stats, busy) = jax.lax.scan(step, (buffer[0], buffer), jnp.arange(plan.steps))
    buffer = jnp.roll(buffer, plan.steps, axis=0)  # place p back to microbatch p
    buffer = jax.lax.psum(jnp.where(s == 0, buffer, 0), axes)  # stage 0's, on every stage
    # MoE statistics: the mean over the (stage, step) items that did work
    busy = busy.astype(jnp.float32)
    stats = jax.tree.map(lambda v: jax.lax.psum((v * busy).sum(), axes)
                         / jax.lax.psum(busy.sum(), axes), stats)
    return buffer, stats
