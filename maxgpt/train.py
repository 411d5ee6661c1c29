"""Training: abstract -> sharded initialisation, the pure train step, and the loop.

The train state crosses the jit boundary as a plain pytree,
`{"params": {...}, "opt_state": ..., "step", "skipped_steps", "bad_in_a_row": int32}`, with
parameters as a pure nested dict
(`nnx.to_pure_dict`); the model is rebuilt inside the step with `nnx.merge(graphdef, params)`.
The step is jitted once with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from maxgpt import distributed, sharding
from maxgpt.config import Config, ConfigError
from maxgpt.checkpoint import Checkpointer, SaveTimer, load_params
from maxgpt.data import SyntheticSource
from maxgpt.data.pipeline import (BATCH_KEYS, Corpus, StreamReader, batches, check_eval_split,
                                  describe, resolve_corpus)
from maxgpt.evaluate import evaluate
from maxgpt.generate import print_sample
from maxgpt.flops import flops_per_token, peak_flops
from maxgpt.metrics import MetricsWriter
from maxgpt.model import Transformer
from maxgpt.loss import chunk_size, token_losses
from maxgpt.optim import learning_rate, make_optimizer
from maxgpt.owner import Owner
from maxgpt.profiling import Profile
from maxgpt.preemption import StopRequest
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything about a run that is fixed once the config and mesh are known."""

    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef  # the model's structure; parameters travel as pure dicts
    optimizer: optax.GradientTransformation
    state_shardings: dict
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
            moe_z: float = 0.0, loss_chunk: int = 0):
    """Summed token cross-entropy (plus z-loss and, for MoE models, the routing losses) over
    non-padding tokens; aux (summed nll, token count, MoE routing stats or {}).

    Sums, not means, so that microbatches add up exactly to the full batch: the routing
    losses, means over tokens, enter weighted by the token count. The cross-entropy is taken
    `loss_chunk` positions at a time (maxgpt/loss.py).
    """
    model = nnx.merge(graphdef, params)
    hidden, moe = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                               dropout_key)
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)  # segment 0 is padding
    output = model.output_weights()  # gathered once for all the loss's pieces
    nll, z_sum = token_losses(lambda h: model.logits(h, output), hidden, batch["targets"],
                              weights, chunk_size(loss_chunk, batch["targets"].shape[1]))
    objective = nll + z_loss * z_sum
    if moe:
        objective += weights.sum() * (moe_balance * moe["balance_loss"] + moe_z * moe["z_loss"])
    return objective, (nll, weights.sum(), moe)


def all_finite(tree) -> jax.Array:
    """True when no leaf of `tree` holds inf or nan."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_all_finite = jax.jit(all_finite)  # for the check before a save, outside the step


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
        (_, (mb_nll, mb_tokens, moe)), mb_grads = grad_fn(
            params, graphdef, mb, mb_key, cfg.train.z_loss, cfg.train.moe_balance_loss,
            cfg.train.moe_z_loss, cfg.train.loss_chunk)
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


def eval_step(params, batch, *, graphdef, loss_chunk: int = 0):
    """Summed nll, token count and target UTF-8 bytes of one batch, no dropout."""
    _, (nll, tokens, _) = loss_fn(params, graphdef, batch, None, 0.0, loss_chunk=loss_chunk)
    return nll, tokens, jnp.where(batch["segment_ids"] > 0, batch["target_bytes"], 0).sum()


def _check_mesh(cfg: Config, mesh: Mesh) -> None:
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


def build_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    _check_mesh(cfg, mesh)
    graphdef, abstract_params = abstract_model(cfg)
    optimizer = make_optimizer(cfg)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract_params))
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated,
                "skipped_steps": replicated, "bad_in_a_row": replicated}
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)
    evaluate = jax.jit(lambda params, batch: eval_step(params, batch, graphdef=graphdef,
                                                       loss_chunk=cfg.train.loss_chunk),
                       in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    return Trainer(cfg, mesh, graphdef, optimizer, state_sh, batch_sh, step, evaluate)


def _init_fn(trainer: Trainer) -> Callable[[], dict[str, Any]]:
    cfg, optimizer = trainer.cfg, trainer.optimizer

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(cfg.train.seed))))
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


def _describe_compile(compiled, seconds: float) -> str:
    text = f"compiled train step in {seconds:.1f}s"
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2**30
        text += (f"; per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, "
                 f"temporaries {memory.temp_size_in_bytes / gib:.2f} GiB")
    return text


def open_corpus(cfg: Config, run_dir: RunDir | None) -> Corpus | None:
    """The run's data; a run directory's own tokenizer.model wins (a resumed or evaluated
    run reads with the tokenizer it was trained with). All processes must read with the
    same tokenizer (each may have built the built-in corpus's on its own host)."""
    own = None if run_dir is None else run_dir.tokenizer_file
    corpus = resolve_corpus(cfg, own if own is not None and own.is_file() else None)
    if corpus is not None:
        prints = distributed.gather_text(corpus.tokenizer.fingerprint)
        if len(set(prints)) > 1:
            raise ConfigError(
                f"the processes of this job read with different tokenizers (fingerprints "
                f"{', '.join(prints)} for processes 0..{len(prints) - 1}, from "
                f"{corpus.tokenizer_path}); give them one data.tokenizer on shared storage")
    return corpus


def make_source(trainer: Trainer, corpus: Corpus | None):
    """This process's endless, checkpointable iterator of its rows of every training batch
    (numpy arrays)."""
    cfg, rows, streams = trainer.cfg, trainer.batch_rows, trainer.streams
    if corpus is None:
        return SyntheticSource(cfg.model.vocab_size, cfg.train.batch_size, cfg.train.seq_len,
                               cfg.train.seed, rows)
    return StreamReader(
        lambda s: batches(corpus, "train", seq_len=cfg.train.seq_len,
                          batch_size=cfg.train.batch_size // streams, seed=cfg.train.seed,
                          stream=(s, streams), num_workers=cfg.data.num_workers,
                          prefetch=cfg.data.prefetch),
        rows, cfg.train.batch_size, streams)


def _abstract_batch(trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (trainer.cfg.train.batch_size, trainer.cfg.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)
            for k in BATCH_KEYS}


def data_fingerprint(trainer: Trainer, corpus: Corpus | None) -> dict[str, Any]:
    """What a saved iterator state is only valid for: resuming with other data settings
    would read other batches (or fail inside grain), so a mismatch is reported instead."""
    cfg = trainer.cfg
    tokenizer = None if corpus is None else corpus.tokenizer.fingerprint
    return {"source": cfg.data.source, "sources": cfg.data.sources, "tokenizer": tokenizer,
            "seq_len": cfg.train.seq_len, "seed": cfg.train.seed,
            "streams": trainer.streams, "num_workers": cfg.data.num_workers,
            "prefetch": cfg.data.prefetch > 0}


def restore_or_init(trainer: Trainer, checkpointer: Checkpointer | None, source,
                    fingerprint: dict, writer: MetricsWriter) -> tuple[dict[str, Any], int]:
    """The newest readable checkpoint's state and data position; else a fresh state, with
    parameters from `checkpoint.load_params_from` if set."""
    abstract = abstract_state(trainer)
    restored = None if checkpointer is None else checkpointer.restore_newest(
        abstract, trainer.state_shardings)
    if restored is None:
        state = init_state(trainer)
        if trainer.cfg.checkpoint.load_params_from:
            params, where = load_params(trainer.cfg.checkpoint.load_params_from,
                                        abstract["params"], trainer.state_shardings["params"])
            state = {**state, "params": params,  # a fresh optimizer state, step 0
                     "opt_state": jax.jit(trainer.optimizer.init, out_shardings=(
                         trainer.state_shardings["opt_state"]))(params)}
            writer.info(f"parameters from {where}; new optimizer state, step 0")
        return state, 0
    step, state, data = restored
    saved = data.get("pipeline", {})
    changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if changed:
        raise ConfigError(
            f"checkpoint {step}'s data position was saved for other data settings ("
            + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            + "); resume with the settings the run started with")
    source.set_state(data["iterator"])
    writer.info(f"resumed from {checkpointer.directory / str(step)}")
    return state, step


def _due(done: int, every: int, last: int) -> bool:
    return done == last or (every > 0 and done % every == 0)


def _check_bad_steps(metrics, cfg: Config, step: int) -> None:
    """Stop after train.max_bad_steps skipped (non-finite) steps in a row."""
    if metrics is not None and int(jax.device_get(metrics["bad_in_a_row"])) >= (
            cfg.train.max_bad_steps):
        raise ConfigError(
            f"{cfg.train.max_bad_steps} steps in a row up to step {step} had a non-finite loss "
            "or gradient (each was skipped, the parameters are unchanged and finite); lower "
            "optim.lr, lengthen optim.warmup_steps or check the data, then continue from the "
            "last checkpoint")


def _save(checkpointer: Checkpointer, step: int, state, source, fingerprint: dict,
          corpus: Corpus | None, cfg: Config) -> None:
    if not bool(_all_finite(state["params"])):  # the step's guard makes this impossible
        raise RuntimeError(f"non-finite parameters at step {step}: not saving them")
    checkpointer.save(step, state, {"pipeline": fingerprint, "iterator": source.get_state()},
                      cfg, None if corpus is None else corpus.tokenizer.model_proto)


def run(cfg: Config, run_dir: PathLike | RunDir | None = None, devices=None,
        echo: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train to `train.steps`, resuming from run_dir's newest checkpoint if it has one.

    An existing run continues only with a config that differs from its config.yaml in
    resumable keys (maxgpt/run_dir.py); its files are rewritten only once the resume is
    accepted. SIGTERM/SIGINT end the run early after the current step, with a checkpoint
    (if there is a run directory). Returns the final state and the logged metric rows.
    """
    owner = None
    if run_dir is not None:
        run_dir = RunDir(run_dir)
        run_dir.check_shared()  # before anything is read or written
        owner = Owner(run_dir.owner_file)
        owner.check()  # a second trainer on a live run is refused
        cfg = run_dir.continue_with(cfg)
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    if not cfg.data.streams:  # fixed now, in config.yaml: a resume keeps the data order
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                streams=trainer.streams))
        trainer = dataclasses.replace(trainer, cfg=cfg)
    corpus = open_corpus(cfg, run_dir)
    if corpus is not None and cfg.train.eval_every > 0:  # fail now, not at the first eval
        check_eval_split(corpus, cfg.train.seq_len, trainer.streams)
    peak, peak_source = peak_flops(list(trainer.mesh.devices.flat))
    n_params = count_params(cfg)  # outside the mesh context: abstract, unsharded shapes
    with contextlib.ExitStack() as stack:
        if owner is not None:  # released last, after the final save is written
            stack.enter_context(contextlib.closing(owner))
        writer = stack.enter_context(contextlib.closing(MetricsWriter(run_dir, cfg.train.steps,
                                                                      echo)))
        checkpointer = None if run_dir is None else stack.enter_context(
            contextlib.closing(Checkpointer(run_dir, cfg.checkpoint)))
        source = stack.enter_context(contextlib.closing(make_source(trainer, corpus)))
        stop = stack.enter_context(contextlib.closing(StopRequest()))
        stack.enter_context(jax.set_mesh(trainer.mesh))
        writer.info(f"maxgpt: {cfg.model.name}, {n_params:,} parameters, mesh "
                    f"{dict(trainer.mesh.shape)}, data {describe(corpus)}; mfu against "
                    f"{peak_source}")
        fingerprint = data_fingerprint(trainer, corpus)
        state, first = restore_or_init(trainer, checkpointer, source, fingerprint, writer)
        if run_dir is not None:  # the start or resume is accepted: now the run is written
            owner.claim()
            run_dir.write(cfg, None if corpus is None else corpus.tokenizer.model_proto)
        writer.drop_rows_after(first)  # steps after the checkpoint are trained (logged) again

        start = time.perf_counter()
        compiled = trainer.step_fn.lower(state, _abstract_batch(trainer)).compile()
        writer.info(_describe_compile(compiled, time.perf_counter() - start))
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        flops_per_step = flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
        byte_lengths = None if corpus is None else corpus.tokenizer.byte_lengths()
        history, previous, stopped, done = [], None, False, first
        last_time, last_step = time.perf_counter(), first
        profile = Profile(cfg.train.profile_range(), run_dir, writer)
        stack.callback(profile.stop)
        timer = SaveTimer(cfg.checkpoint.every_minutes if checkpointer else 0, trainer.mesh)
        for step in range(first, cfg.train.steps):
            profile.before(step + 1)
            state, metrics = compiled(state, trainer.global_batch(next(source)))
            done = step + 1
            profile.after(done, metrics)
            # The previous step's verdict, read while this one runs: no stall per step.
            _check_bad_steps(previous, cfg, done - 1)
            previous = metrics
            stopped = stop(done)
            timed = timer.due()
            if stopped or done == first + 1 or _due(done, cfg.train.log_every, cfg.train.steps):
                metrics = jax.device_get(metrics)  # waits for the step: honest timing
                now = time.perf_counter()
                step_time = (now - last_time) / (done - last_step)
                history.append(writer.write({
                    "step": done, "loss": metrics["loss"], "lr": metrics["lr"],
                    "grad_norm": metrics["grad_norm"],
                    "tokens_per_sec": tokens_per_step / step_time, "step_time_s": step_time,
                    "mfu": None if peak is None else flops_per_step / step_time / peak,
                    "tokens_seen": done * tokens_per_step,  # training rows are never padded
                    "skipped_steps": metrics["skipped_steps"],
                    **{k: v for k, v in metrics.items() if k.startswith("moe_")}}))
                last_time, last_step = now, done
            # Save before evaluating: a failing evaluation must not cost the checkpoint.
            saving = checkpointer is not None and (
                stopped or timed or _due(done, cfg.checkpoint.every, cfg.train.steps))
            if saving:
                _save(checkpointer, done, state, source, fingerprint, corpus, cfg)
                timer.saved()
            if stopped:
                writer.info(f"maxgpt: {stop.signal_name or 'preemption'}: stopped after step "
                            f"{done}" + (f", checkpoint saved; continue with `maxgpt train "
                                         f"--run-dir {run_dir}`" if saving else ""))
                break
            evaluating = (corpus is not None and cfg.train.eval_every > 0
                          and _due(done, cfg.train.eval_every, cfg.train.steps))
            if evaluating:
                history.append(writer.write({"step": done, **evaluate(
                    trainer, state["params"], corpus, byte_lengths)}))
            if saving or evaluating:  # not training time
                last_time, last_step = time.perf_counter(), done
        _check_bad_steps(previous, cfg, done)
        if corpus is not None and echo and not stopped:
            print_sample(trainer.graphdef, state["params"], cfg.model, corpus.tokenizer,
                         cfg.train.seed)
    return state, history
