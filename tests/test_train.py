"""Training: sharded meshes equal one device, accumulation equals the big batch, it learns."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from maxgpt import loop, train
from maxgpt.config import ConfigError, load_config
from maxgpt.data import SyntheticSource
from maxgpt.loss import linear_cross_entropy
from maxgpt.optim import decay_mask, learning_rate
from tests import reference as ref
from tests.conftest import make_config

STEPS = 5
BASE = ("train.batch_size=8", "train.seq_len=32", f"train.steps={STEPS}", "train.log_every=1",
        "optim.warmup_steps=2", "optim.lr=1e-2", "model.dtype=float32")


def run(*overrides, devices=None, preset="tiny"):
    cfg = make_config(preset, *BASE, *overrides)
    state, history = loop.run(cfg, devices=devices, echo=False)
    return np.array([row["loss"] for row in history]), state


@pytest.fixture(scope="module")
def one_device():
    return run("mesh.data=1", devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [
    ("mesh.data=8",), ("mesh.data=1", "mesh.fsdp=8"),
    ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
])
def test_sharded_training_equals_one_device(mesh, one_device):
    losses, state = run(*mesh)
    expected_losses, expected_state = one_device
    assert len(losses) == STEPS and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    # Adam divides by sqrt(v): reordered sums in near-zero gradients move a weight by a small
    # fraction of one lr=1e-2 step, hence atol 1e-4 on the parameters.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 state["params"], expected_state["params"])


def test_tensor_parallel_gpt2_with_biases_equals_one_device():
    gpt2 = ("train.batch_size=8",)
    single, _ = run("mesh.data=1", *gpt2, devices=jax.devices()[:1], preset="tiny-gpt2")
    sharded, _ = run("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4", *gpt2, preset="tiny-gpt2")
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


def test_a_loop_over_layers_equals_the_unrolled_stack(one_device):
    """model.unroll_layers: auto unrolls the whole stack on CPU (the one_device run); one
    layer per loop step, or two, trains identically."""
    for unroll in (1, 2):
        losses, _ = run("mesh.data=1", f"model.unroll_layers={unroll}", devices=jax.devices()[:1])
        np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)


def test_accumulating_4_microbatches_of_2_equals_1_batch_of_8(one_device):
    accumulated, state = run("mesh.data=1", "train.microbatches=4", devices=jax.devices()[:1])
    np.testing.assert_allclose(accumulated, one_device[0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 state["params"], one_device[1]["params"])
    # and across a mesh, where each microbatch is itself split over the data axis
    sharded, _ = run("mesh.data=2", "mesh.tensor=4", "train.microbatches=4")
    np.testing.assert_allclose(sharded, one_device[0], rtol=2e-5)


def test_loss_falls_on_a_repeated_batch():
    cfg = make_config("tiny", *BASE, "train.steps=40", "mesh.data=8")
    trainer = train.build_trainer(cfg, train.sharding.make_mesh(cfg.mesh))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 256, (8, 32)), "targets": rng.integers(0, 256, (8, 32)),
             "positions": np.tile(np.arange(32), (8, 1)), "segment_ids": np.ones((8, 32))}
    batch = {k: jax.device_put(v.astype(np.int32), trainer.batch_sharding)
             for k, v in batch.items()}
    with jax.set_mesh(trainer.mesh):
        state = train.init_state(trainer)
        losses = []
        for _ in range(40):
            state, metrics = trainer.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(256), rel=0.05)  # starts at chance
    assert losses[-1] < 0.2 * losses[0], losses  # memorises random tokens


def params_and_batch(preset, segment_ids, seed):
    """A fresh model's graphdef and one-device state, and a batch of random tokens with the
    given (B, T) segment ids (0: padding)."""
    cfg = make_config(preset, *BASE)
    graphdef, _ = train.abstract_model(cfg)
    state = train.init_state(train.build_trainer(cfg, train.sharding.make_mesh(
        cfg.mesh, jax.devices()[:1])))
    rng = np.random.default_rng(seed)
    B, T = np.shape(segment_ids)
    batch = {"inputs": rng.integers(0, 256, (B, T)), "targets": rng.integers(0, 256, (B, T)),
             "positions": np.tile(np.arange(T), (B, 1)), "segment_ids": np.array(segment_ids)}
    return graphdef, state, {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def test_loss_ignores_padding_and_adds_z_loss():
    graphdef, state, batch = params_and_batch("tiny", [[1] * 8, [1] * 3 + [0] * 5], seed=0)
    logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(
        batch["inputs"], batch["positions"], batch["segment_ids"]))(state["params"]))
    weights = np.asarray(batch["segment_ids"] > 0, np.float64)
    expected, log_z = ref.cross_entropy(logits, np.asarray(batch["targets"]), weights)

    objective, (nll, tokens, _) = train.loss_fn(state["params"], graphdef, batch, None, 1e-2)
    assert tokens == 11
    np.testing.assert_allclose(nll / tokens, expected, rtol=1e-5)
    np.testing.assert_allclose(objective, nll + 1e-2 * (log_z**2 * weights).sum(), rtol=1e-5)

    # whatever sits in the padding changes nothing
    padded = dict(batch, inputs=batch["inputs"].at[1, 3:].set(7),
                  targets=batch["targets"].at[1, 3:].set(9))
    np.testing.assert_allclose(train.loss_fn(state["params"], graphdef, padded, None, 0.0)[0],
                               nll, rtol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])  # untied and tied output layer
@pytest.mark.parametrize("chunk", [16, 4])
def test_loss_gradient_equals_autodiff_of_the_whole_logits(preset, chunk):
    """The training loss over the whole sequence (the output layer's gradient computed in its
    forward pass, loss.linear_cross_entropy) and in pieces of 4 of 16 positions
    (recomputed logits, loss.token_losses): the same objective, nll and gradients (z-loss and padding included) as autodiff of the
    model's logits of the whole sequence, log-softmax written out."""
    graphdef, state, batch = params_and_batch(
        preset, [[1] * 16, [1] * 6 + [2] * 5 + [0] * 5], seed=1)
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)

    def reference(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        log_probs = jax.nn.log_softmax(model.logits(hidden), axis=-1)
        log_z = jax.nn.logsumexp(model.logits(hidden), axis=-1)
        target = jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
        nll = -(target * weights).sum()
        return nll + 1e-2 * (log_z**2 * weights).sum(), nll

    (want, want_nll), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
        state["params"])
    (got, (nll, tokens, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: train.loss_fn(p, graphdef, batch, None, 1e-2, loss_chunk=chunk),
        has_aux=True))(state["params"])
    assert tokens == 27
    np.testing.assert_allclose(nll, want_nll, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(  # float32 summation order
        a, b, rtol=1e-5, atol=1e-6 * scale), grads, want_grads)


def test_loss_refuses_to_differentiate_its_reported_nll():
    """linear_cross_entropy computes the gradient of the objective only: asking for the
    nll's is an error, not a silently wrong gradient."""
    x = jnp.ones((1, 4, 8))
    w = jnp.ones((8, 16))
    targets, weights = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))
    with pytest.raises(NotImplementedError, match="first output only"):
        jax.grad(lambda x: linear_cross_entropy(x, w, targets, weights, 0.0, 16)[1])(x)


def test_cross_entropy_in_pieces_never_holds_the_whole_logits():
    """XLA's own accounting of the compiled train step: with 64-position pieces the
    temporaries shrink by more than the (B, T, V) fp32 logits and their gradient would take
    (one piece's still exist). (Equal losses and gradients: the test above.)"""
    shape = ("model.vocab_size=8192", "train.seq_len=256", "model.max_seq_len=256",
             "mesh.data=1")

    def temporaries(*extra):
        cfg = make_config("tiny", *BASE, *shape, *extra)
        trainer = train.build_trainer(cfg, train.sharding.make_mesh(cfg.mesh,
                                                                   jax.devices()[:1]))
        with jax.set_mesh(trainer.mesh):
            compiled = trainer.step_fn.lower(train.abstract_state(trainer),
                                             train._abstract_batch(trainer)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits = 8 * 256 * 8192 * 4
    whole, pieces = temporaries("train.loss_chunk=256"), temporaries("train.loss_chunk=64")
    assert whole - pieces > 1.5 * logits * (1 - 64 / 256), (whole, pieces)


def test_weight_decay_skips_norms_and_biases():
    cfg = make_config("tiny-gpt2")
    _, params = train.abstract_model(cfg)
    mask = decay_mask(nnx.to_pure_dict(params))
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["embed"] and flat["pos_embed"] and flat["blocks/attn/q_proj"]
    assert flat["blocks/mlp/down_proj"]
    for name in ("blocks/attn/q_bias", "blocks/mlp/up_bias", "blocks/attn_norm/scale",
                 "blocks/attn_norm/bias", "final_norm/scale"):
        assert flat[name] is False, name


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(decay):
    cfg = make_config("tiny", "train.steps=11", "optim.warmup_steps=4", "optim.lr=1.0",
                      "optim.min_lr_ratio=0.1", f"optim.decay={decay}")
    lr = [float(learning_rate(cfg)(s)) for s in range(11)]
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])  # warmup, never 0
    assert lr[4] == pytest.approx(1.0)
    expected_mid = {"cosine": 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)),
                    "linear": 1.0 - 0.9 * 0.5, "constant": 1.0}[decay]
    assert lr[7] == pytest.approx(expected_mid)  # halfway through the decay
    assert lr[10] == pytest.approx(1.0 if decay == "constant" else 0.1)


def test_run_dir_metrics_and_config(tmp_path):
    cfg = make_config("tiny", *BASE, "train.log_every=2")
    loop.run(cfg, tmp_path / "run", echo=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 5]  # the first, every 2nd, the last
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu",
                "tokens_seen"} <= row.keys()
        assert row["tokens_seen"] == row["step"] * 8 * 32
        assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
    # data.streams=0 is written down as what it meant for this run (1: one process)
    assert load_config(tmp_path / "run/config.yaml") == dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, streams=1))
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["train"]["steps"] == STEPS
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))


def test_synthetic_rows_do_not_depend_on_sharding():
    source = SyntheticSource(vocab_size=97, batch_size=8, seq_len=16, seed=3)
    full = source.rows(5, range(8))
    part = source.rows(5, [1, 4, 6])
    np.testing.assert_array_equal(full["inputs"][[1, 4, 6]], part["inputs"])
    np.testing.assert_array_equal(full["inputs"][:, 1:], full["targets"][:, :-1])
    stride = (full["targets"][:, 0] - full["inputs"][:, 0]) % 97
    np.testing.assert_array_equal((full["inputs"][:, 0:1] + stride[:, None] *
                                   np.arange(16)) % 97, full["inputs"])


TEXT = ("data.source=builtin", "model.vocab_size=512", "optim.decay=constant",
        "optim.warmup_steps=0", "train.eval_every=0", "data.num_workers=1")


def test_resumed_run_sees_exactly_the_batches_of_a_straight_run(tmp_path):
    """6 steps straight == 3 steps, a restart from the step-3 checkpoint (tokenising worker
    process, row window and all), 3 more: same losses bit for bit, so the data iterator
    resumed mid-stream exactly. Rows logged past the checkpoint before a crash are dropped."""
    mesh = ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4")
    cfg = make_config("tiny", *BASE, *TEXT, *mesh, "train.steps=6", "checkpoint.every=3")
    _, straight = loop.run(cfg, tmp_path / "straight", echo=False)
    half = make_config("tiny", *BASE, *TEXT, *mesh, "train.steps=3", "checkpoint.every=3")
    loop.run(half, tmp_path / "resumed", echo=False)
    with (tmp_path / "resumed/metrics.jsonl").open("a") as f:  # logged, then a crash
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    _, resumed = loop.run(cfg, tmp_path / "resumed", echo=False)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[3:]]
    rows = [json.loads(line) for line in
            (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]

    # Other data settings cannot continue this data position: one clear error, nothing lost.
    moved = make_config("tiny", *BASE, *TEXT, *mesh, "train.steps=7", "data.num_workers=0")
    with pytest.raises(ConfigError, match="data.num_workers=1, this command asks for "
                                          "data.num_workers=0"):
        loop.run(moved, tmp_path / "resumed", echo=False)
    restreamed = make_config("tiny", *BASE, *TEXT, *mesh, "train.steps=7", "data.streams=2")
    with pytest.raises(ConfigError, match="data.streams=1, this command asks for data.streams=2"):
        loop.run(restreamed, tmp_path / "resumed", echo=False)
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir()) == ["3", "6"]


def test_profile_steps_trace_exactly_those_steps(tmp_path):
    """profile_steps=2:3 of 5: a trace in which the train step runs twice (each call shows
    as a Python event with a nested one: count the outermost)."""
    cfg = make_config("tiny", *BASE, "mesh.data=1", "train.profile_steps=2:3")
    loop.run(cfg, tmp_path / "run", devices=jax.devices()[:1], echo=False)
    traces = list((tmp_path / "run/profile").rglob("*.xplane.pb"))
    assert len(traces) == 1
    calls = sorted((e.start_ns, e.start_ns + e.duration_ns)
                   for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
                   for line in plane.lines for e in line.events if "train_step" in e.name)
    outermost, end = 0, float("-inf")
    for start, stop in calls:
        if start >= end:
            outermost, end = outermost + 1, stop
    assert outermost == 2


def test_a_step_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path):
    """XLA's memory analysis of the step, compiled from shapes alone, against the device's
    memory (here: the host's RAM over its 8 devices): refused before the state, the data or
    any file of the run exists."""
    cfg = make_config("tiny", "train.batch_size=100000000", "train.seq_len=32")
    with pytest.raises(ConfigError, match=r"needs [\d,.]+ GiB per device \(temporaries [\d,.]+ "
                                          r"GiB\) but has [\d,.]+ GiB \(this host's RAM shared "
                                          r"by 8 devices\); shrink the activations: model.remat=full"):
        loop.run(cfg, tmp_path / "run", echo=False)
    assert os.listdir(tmp_path / "run") == [".maxgpt-probes"]
