"""Mixture of experts: the layer against a per-token reference, routing statistics by hand,
expert parallelism against one device, parameter counts against published numbers."""

import functools
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxgpt import loop, train
from maxgpt.config import load_config
from maxgpt.flops import matmul_params_per_token
from maxgpt.metrics import format_row
from maxgpt.model import Transformer
from maxgpt.model.moe import (MoE, capacity, expert_groups, from_groups, grouped_dot,
                              routing_stats, to_groups)
from tests import reference as ref
from tests.conftest import REPO, make_config
from tests.test_model import close, packed_batch, randomized


def moe_layer(*overrides, std=0.3):
    cfg = make_config("tiny-moe", *overrides).model
    layer, p = randomized(MoE(cfg, nnx.Rngs(0)), std=std)
    return cfg, layer, p


def inputs(cfg, B=2, T=12, seed=1):
    x = np.random.default_rng(seed).normal(size=(B, T, cfg.embed_dim)).astype(np.float32)
    valid = np.ones((B, T), bool)
    valid[1, -3:] = False  # padding at the end of row 2
    return x, valid


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_moe_layer_equals_per_token_reference(k, routing, dispatch):
    # capacity mode with room for every assignment (T * k per expert) must drop nothing
    cfg, layer, p = moe_layer(f"model.experts_per_token={k}", f"model.moe_routing={routing}",
                              f"model.moe_dispatch={dispatch}", "model.capacity_factor=4")
    x, valid = inputs(cfg)
    y, stats = layer(jnp.asarray(x), jnp.asarray(valid))
    expected, dropped = ref.moe(p, ref.f64(x), cfg, valid)
    assert dropped == 0 and float(stats["dropped"]) == 0
    close(y, expected, 1e-4)
    np.testing.assert_array_equal(np.asarray(y)[~valid], 0)  # padding reaches no expert


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_shared_experts_and_gelu_experts(mlp):
    cfg, layer, p = moe_layer(f"model.mlp={mlp}", "model.num_shared_experts=2")
    x, valid = inputs(cfg)
    close(layer(jnp.asarray(x), jnp.asarray(valid))[0], ref.moe(p, ref.f64(x), cfg, valid)[0],
          1e-4)


@pytest.mark.parametrize("k, factor", [(1, 0.5), (2, 0.5), (2, 1.0)])
def test_capacity_drops_overflow_in_priority_order(k, factor):
    cfg, layer, p = moe_layer("model.moe_dispatch=capacity", f"model.capacity_factor={factor}",
                              f"model.experts_per_token={k}")
    x, valid = inputs(cfg)
    C = capacity(cfg, x.shape[1])
    assert C == math.ceil(factor * 12 * k / 4)
    y, stats = layer(jnp.asarray(x), jnp.asarray(valid))
    expected, dropped = ref.moe(p, ref.f64(x), cfg, valid, capacity=C)
    assert dropped > 0
    close(y, expected, 1e-4)
    np.testing.assert_allclose(float(stats["dropped"]), dropped / (k * valid.sum()), rtol=1e-6)


def test_dropless_equals_capacity_mode_when_nothing_overflows():
    cfg = make_config("tiny-moe", "model.num_layers=4", "model.moe_every=2").model
    model, params = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    graphdef = nnx.graphdef(model)
    big = make_config("tiny-moe", "model.num_layers=4", "model.moe_every=2",
                      "model.moe_dispatch=capacity", "model.capacity_factor=2").model
    capacity_model = nnx.merge(nnx.graphdef(Transformer(big, nnx.Rngs(0))), params)
    tokens, positions, segments = (jnp.asarray(a) for a in packed_batch())
    dropless, stats = nnx.merge(graphdef, params).forward(tokens, positions, segments)
    capped, capped_stats = capacity_model.forward(tokens, positions, segments)
    assert float(capped_stats["dropped"]) == 0
    np.testing.assert_allclose(capped, dropless, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [
    ("tiny-moe",),  # every layer MoE (Mixtral)
    ("tiny-moe", "model.num_layers=4", "model.moe_every=2"),  # alternating (GShard, Switch)
    ("tiny-moe", "model.num_layers=3", "model.moe_every=3", "model.moe_routing=softmax_topk",
     "model.experts_per_token=1"),  # Switch: top-1, one layer in three
])
def test_moe_model_matches_naive_reference(variant):
    cfg = make_config(*variant).model
    model, p = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    tokens, positions, segments = packed_batch(vocab=cfg.vocab_size)
    got = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    close(got, ref.forward(p, tokens, cfg, positions, segments), 5e-4)
    if cfg.moe_every > 1:  # the MoE layers are their own stack
        assert p["moe_blocks"]["mlp"]["router"].shape[0] == cfg.num_layers // cfg.moe_every
        assert p["blocks"]["mlp"]["up_proj"].ndim == 3  # (layers, D, F): dense


def test_balance_loss_z_loss_and_load_on_a_hand_built_routing():
    # 5 tokens, 2 experts, top-1: tokens 0-2 pick expert 0, token 3 picks expert 1, token 4
    # is padding and counts for nothing.
    logits = np.array([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 9.0]])
    valid = np.array([True, True, True, True, False])
    experts = np.array([[0], [0], [0], [1], [1]])
    stats = routing_stats(jnp.asarray(logits, jnp.float32), jnp.asarray(experts),
                          jnp.asarray(valid))

    def p0(a, b):  # softmax probability of expert 0
        return math.exp(a) / (math.exp(a) + math.exp(b))

    P0 = (p0(2, 0) + p0(1, 0) + p0(3, 0) + p0(0, 1)) / 4
    f0, f1 = 3 / 4, 1 / 4
    assert float(stats["balance_loss"]) == pytest.approx(2 * (f0 * P0 + f1 * (1 - P0)), rel=1e-6)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in logits[:4]]
    assert float(stats["z_loss"]) == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    assert float(stats["load_max_mean"]) == pytest.approx(3 / 2)
    # perfectly even routing with uniform probabilities: exactly 1
    even = routing_stats(jnp.zeros((4, 2)), jnp.asarray([[0, 1], [1, 0], [0, 1], [1, 0]]),
                         jnp.ones(4, bool))
    assert float(even["balance_loss"]) == pytest.approx(1.0)
    assert float(even["load_max_mean"]) == pytest.approx(1.0)


STEPS = 5
BASE = ("train.batch_size=8", "train.seq_len=32", f"train.steps={STEPS}", "train.log_every=1",
        "optim.warmup_steps=2", "optim.lr=1e-2", "model.num_experts=8")
DISPATCH = {"dropless": ("model.moe_dispatch=dropless",),
            # a capacity that really drops: the same tokens on every mesh, capacity is per row
            "capacity": ("model.moe_dispatch=capacity", "model.capacity_factor=1.0")}


def moe_run(dispatch, *overrides, devices=None):
    cfg = make_config("tiny-moe", *BASE, *DISPATCH[dispatch], *overrides)
    state, rows = loop.run(cfg, devices=devices, echo=False)
    return rows, state


@functools.cache
def moe_one_device(dispatch):
    return moe_run(dispatch, "mesh.data=1", devices=jax.devices()[:1])


@pytest.mark.parametrize("dispatch, mesh", [
    ("dropless", ("mesh.expert=4", "mesh.data=2")),
    ("dropless", ("mesh.expert=8", "model.remat=full")),  # shard_map under jax.checkpoint
    ("dropless", ("mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2")),
    ("capacity", ("mesh.expert=4", "mesh.data=2")), ("capacity", ("mesh.expert=8",)),
])
def test_expert_parallel_training_equals_one_device(dispatch, mesh):
    expected_rows, expected_state = moe_one_device(dispatch)
    rows, state = moe_run(dispatch, *mesh)
    keys = ("loss", "moe_balance_loss", "moe_z_loss", "moe_dropped", "moe_load_max_mean")
    for key in keys:
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in expected_rows],
                                   rtol=2e-5, atol=1e-6, err_msg=key)
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    dropped = [r["moe_dropped"] for r in rows]
    assert (max(dropped) > 0) == (dispatch == "capacity")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 state["params"], expected_state["params"])


def test_router_and_expert_weights_are_sharded_over_the_expert_axis():
    cfg = make_config("tiny-moe", *BASE, "mesh.expert=4", "mesh.fsdp=2")
    trainer = train.build_trainer(cfg, train.sharding.make_mesh(cfg.mesh))
    mlp = trainer.state_shardings["params"]["blocks"]["mlp"]
    P = jax.sharding.PartitionSpec
    assert mlp["up_proj"].spec == P(None, "expert", "fsdp", None)
    assert mlp["down_proj"].spec == P(None, "expert", None, "fsdp")
    assert mlp["router"].spec == P(None, "fsdp", None)
    assert trainer.batch_sharding.spec == P(("data", "fsdp", "expert"), None)


# Published: Mixtral 8x7B 46.7B total, 12.9B active (Jiang et al. 2024); GPT-4 ~1.8T total
# (third-party estimates, see configs/models/gpt4-moe.yaml).
@pytest.mark.parametrize("preset, total, active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("gpt4-moe", 1.8e12, None)])
def test_moe_parameter_counts(preset, total, active):
    cfg = load_config(f"{REPO}/configs/models/{preset}.yaml")
    out = subprocess.run([sys.executable, "-m", "maxgpt", "params", "--json", "--config",
                          f"configs/models/{preset}.yaml"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    counts = json.loads(out)
    assert counts["total"] == train.count_params(cfg)
    assert counts["total"] == pytest.approx(total, rel=0.02)
    # for inference: float32, or int8/int4 matmul weights (~all of a MoE) and float scales
    weights = counts["weight_bytes"]
    assert weights["float32"] == 4 * (counts["total"] + counts["vocab_padding"])
    assert 0.25 < weights["int8"] / weights["float32"] < 0.26
    assert 0.125 < weights["int4"] / weights["float32"] < 0.135
    if active:
        assert counts["active"] == pytest.approx(active, rel=0.01)
    # active = total minus the experts a token skips, counted from the parameter shapes
    m = cfg.model
    _, abstract = train.abstract_model(cfg)
    up = nnx.to_pure_dict(abstract)["blocks"]["mlp"]["up_proj"]
    per_expert = (3 if m.mlp == "swiglu" else 2) * up.shape[-2] * up.shape[-1]
    assert counts["total"] - counts["active"] == (
        m.num_layers * (m.num_experts - m.experts_per_token) * per_expert)


def test_flops_count_the_active_experts_only():
    cfg = make_config("tiny-moe", "model.num_shared_experts=1")
    pure = nnx.to_pure_dict(train.abstract_model(cfg)[1])
    blocks = pure["blocks"]
    m = cfg.model
    attention = sum(blocks["attn"][f"{n}_proj"].size for n in "qkvo")
    experts = sum(blocks["mlp"][f"{n}_proj"].size for n in ("up", "gate", "down"))
    shared = sum(blocks["mlp"]["shared"][f"{n}_proj"].size for n in ("up", "gate", "down"))
    expected = (attention + experts * m.experts_per_token // m.num_experts + shared
                + blocks["mlp"]["router"].size + pure["lm_head"].size)
    assert matmul_params_per_token(m) == expected


@pytest.mark.parametrize("tiled", [True, False])
def test_grouped_dot_equals_a_loop_over_rows(tiled):
    """Rows in any order, grouped by expert (tiles of CPU_EXPERT_TILE on CPU; packed for
    ragged_dot elsewhere), multiplied by their expert's weights and put back in order: each
    row times its own expert's matrix, zero for rows in no group; the gradients (gathers
    both ways, `move_rows`) equal those of that loop."""
    rng = np.random.default_rng(0)
    ids = np.array([2, 0, 4, 2, 2, 3, 0, 4, 2, 0, 0, 2, 3, 4, 2, 2, 0, 2, 4, 0])  # 4: none
    x = rng.normal(size=(20, 6)).astype(np.float32)
    w = rng.normal(size=(4, 6, 7)).astype(np.float32)  # expert 1 gets no rows
    expected = np.stack([ref.f64(x[i]) @ ref.f64(w[e]) if e < 4 else np.zeros(7)
                         for i, e in enumerate(ids)])

    def ours(x, w):
        g = expert_groups(jnp.asarray(ids, jnp.int32), 4, tiled)
        return from_groups(grouped_dot(to_groups(x, g), w, g), g)

    def loop(x, w):
        return jnp.stack([x[i] @ w[e] if e < 4 else jnp.zeros(7) for i, e in enumerate(ids)])

    close(jax.jit(ours)(jnp.asarray(x), jnp.asarray(w)), expected, 1e-5)
    r = jnp.asarray(rng.normal(size=(20, 7)).astype(np.float32))
    got, want = (jax.grad(lambda x, w: (f(x, w) * r).sum(), (0, 1))(jnp.asarray(x),
                                                                    jnp.asarray(w))
                 for f in (jax.jit(ours), loop))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_moe_checkpoint_resumes_on_another_expert_mesh(tmp_path):
    """Alternating dense/MoE layers (two parameter stacks), saved on expert=8 after 2 steps,
    resumed on expert=2 x data=4: steps 3-4 as in the uninterrupted expert=8 run."""
    def cfg(steps, *mesh):
        return make_config("tiny-moe", *BASE, "model.moe_every=2", f"train.steps={steps}",
                           "checkpoint.every=2", "optim.decay=constant", *mesh)

    _, straight = loop.run(cfg(4, "mesh.expert=8", "mesh.data=1"), tmp_path / "a", echo=False)
    loop.run(cfg(2, "mesh.expert=8", "mesh.data=1"), tmp_path / "b", echo=False)
    _, resumed = loop.run(cfg(4, "mesh.expert=2", "mesh.data=4"), tmp_path / "b", echo=False)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "moe_balance_loss", "moe_load_max_mean"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in straight[2:]],
                                   rtol=2e-5, err_msg=key)


def test_console_row_shows_routing_and_survives_a_non_finite_step():
    row = {"step": 3, "loss": None, "lr": 1e-3, "grad_norm": None, "tokens_per_sec": 100.0,
           "step_time_s": 0.5, "mfu": None, "skipped_steps": 1, "moe_balance_loss": 1.25,
           "moe_z_loss": 2.0, "moe_dropped": 0.125, "moe_load_max_mean": 1.5}
    assert format_row(row, 10) == ("step 3/10 | loss nan | lr 1.00e-03 | gnorm nan | 100 tok/s | "
                                   "0.500 s/step | skipped 1 | moe balance 1.250 load 1.50 "
                                   "dropped 12.5%")
