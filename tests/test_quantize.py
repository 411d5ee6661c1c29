"""Quantization (maxgpt/quantize.py): int8/fp8 training dots, int8/int4 weights for inference.

References are independent of qwix: numpy rounding with absmax scales for the dots, the
float model for training and evaluation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maxgpt import quantize, sharding, train
from maxgpt.config import ConfigError
from tests.conftest import make_config
from tests.test_train import BASE, run

ONE = jax.devices()[:1]


def rounded(a, axis):
    """Symmetric int8 with a scale per slice along `axis`: absmax / 127 (every extreme lands
    on +-127), rounded half to even."""
    a = np.asarray(a, np.float64)
    scale = np.abs(a).max(axis, keepdims=True) / 127
    return np.round(a / scale) * scale


def reference_dot(x, w):
    """int8 x int8 with a scale per row of x and per column of w, in float64."""
    xq, wq = rounded(x, 1), rounded(w, 0)
    return xq @ wq, xq, wq


def test_int8_dot_and_its_gradient_equal_a_reference_on_any_layout():
    """Forward: the rounded operands' product; backward: straight through the rounding (the
    gradient of the product at the rounded operands). The same on one device and with the
    rows, or the contracted axis, split over devices (absmax over the whole axis)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 48)).at[::2, 0].set(-5.0)  # rows with a negative extreme
    w = jax.random.normal(kw, (48, 40)) * 0.1
    g = jax.random.normal(kg, (64, 40))
    y_ref, xq, wq = reference_dot(x, w)
    fn = jax.jit(jax.value_and_grad(lambda x, w: (quantize.dot(x, w, "int8") * g).sum(),
                                    argnums=(0, 1)))
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for x_spec, w_spec in [(None, None), (P("a"), P()), (P("a", "b"), P("b")),
                           (P(None, "b"), P(None, "b"))]:
        args = (x, w) if x_spec is None else (jax.device_put(x, NamedSharding(mesh, x_spec)),
                                              jax.device_put(w, NamedSharding(mesh, w_spec)))
        value, (dx, dw) = fn(*args)
        np.testing.assert_allclose(value, (y_ref * np.asarray(g)).sum(), rtol=1e-5)
        np.testing.assert_allclose(dx, np.asarray(g) @ wq.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw, xq.T @ np.asarray(g), rtol=1e-4, atol=1e-4)
    # and it is not the float product: int8 rounding moves it by ~1/127 of the range
    assert np.abs(np.asarray(quantize.dot(x, w, "int8")) - np.asarray(x @ w)).max() > 1e-3


def test_expert_dots_split_over_a_contracted_axis_use_the_whole_axis_scales():
    """The experts' down projection inside the MoE shard_map, its hidden units split over
    `tensor`: scales from the whole axis (pmax), so it equals the unsplit dot."""
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 16, 32))  # (experts, rows, hidden)
    w = jax.random.normal(kw, (2, 32, 8))
    whole = quantize.batched_dot(x, w, "int8")
    mesh = jax.make_mesh((4,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.jit(jax.shard_map(
        lambda a, b: jax.lax.psum(quantize.batched_dot(a, b, "int8", "tensor"), "tensor"),
        mesh=mesh, in_specs=(P(None, None, "tensor"), P(None, "tensor")), out_specs=P()))
    np.testing.assert_allclose(split(x, w), whole, rtol=1e-5, atol=1e-5)
    per_shard = jax.jit(jax.shard_map(
        lambda a, b: jax.lax.psum(quantize.batched_dot(a, b, "int8"), "tensor"),
        mesh=mesh, in_specs=(P(None, None, "tensor"), P(None, "tensor")), out_specs=P()))
    assert np.abs(np.asarray(per_shard(x, w)) - np.asarray(whole)).max() > 1e-4  # the test sees it


def gradients(preset, *overrides, devices=None):
    """The gradient of one batch's loss at a fresh model, on the mesh the overrides give."""
    cfg = make_config(preset, *BASE, *overrides)
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    state = train.init_state(trainer)
    rng = np.random.default_rng(0)
    local = {"inputs": rng.integers(0, 256, (8, 32)), "targets": rng.integers(0, 256, (8, 32)),
             "positions": np.tile(np.arange(32), (8, 1)), "segment_ids": np.ones((8, 32))}
    with jax.set_mesh(trainer.mesh):
        batch = trainer.global_batch({k: v.astype(np.int32) for k, v in local.items()})
        grad = jax.jit(jax.grad(lambda p, b: train.loss_fn(p, trainer.graphdef, b, None, 0.0)[0]))
        return jax.tree.leaves(jax.device_get(grad(state["params"], batch)))


def distance(a, b):  # the largest relative L2 distance over the parameters
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),
    ("tiny-moe", ("mesh.data=2", "mesh.expert=2", "mesh.tensor=2")),
    ("tiny", ("mesh.stage=2", "mesh.fsdp=2", "mesh.data=2")),  # pipeline
    ("tiny", ("mesh.context=2", "mesh.fsdp=4", "mesh.data=1")),  # sequences split
    ("tiny", ("mesh.fsdp=8", "mesh.data=1", "model.remat=full")),  # recomputed backward
    ("tiny", ("mesh.fsdp=4", "mesh.data=2", "model.remat=dots_offload")),
    ("tiny-moe", ("mesh.data=2", "mesh.expert=4", "model.moe_dispatch=capacity")),
])
def test_int8_training_on_any_mesh_equals_one_device(preset, overrides):
    """Every quantized dot equals one device's (the test above), so the int8 gradient on a
    mesh (every axis, remat policy and MoE dispatch) is one device's up to float summation
    order: measured 3e-7..5e-7, as for the float model; int8 is 1.7% (dense) / 5% (MoE)
    from float. (With qwix's own int8 scale, absmax / 127.5, negative extremes rounded to
    -127 or -128 by chance and the mesh's gradient was 0.5-1% off.)"""
    model = [o for o in overrides if o.startswith("model.")]
    one = gradients(preset, "mesh.data=1", "model.quantize=int8", *model, devices=ONE)
    float_one = gradients(preset, "mesh.data=1", *model, devices=ONE)
    sharded = gradients(preset, *overrides, "model.quantize=int8")
    assert distance(float_one, one) > 0.01  # quantization is on
    assert distance(sharded, one) < 5e-6


def test_fp8_trains_without_non_finite_steps():
    """fp8 (e4m3, absmax scales) on the tiny model: every step finite, the loss falls, and
    quantization changes the trajectory (it is applied)."""
    plain, _ = run("mesh.data=2", "mesh.fsdp=4")
    losses, state = run("mesh.data=2", "mesh.fsdp=4", "model.quantize=fp8")
    assert np.isfinite(losses).all() and int(state["skipped_steps"]) == 0
    assert losses[-1] < losses[0] and not np.allclose(losses, plain, rtol=1e-6, atol=0)


def test_the_output_layer_is_quantized_only_when_asked():
    """model.quantize leaves the output layer in the compute dtype unless
    model.quantize_output; model.quantize takes only what training supports."""
    from flax import nnx

    from maxgpt.model.transformer import Transformer

    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)

    def logits(*overrides):
        cfg = make_config("tiny", *overrides).model
        return np.asarray(Transformer(cfg, nnx.Rngs(0))(tokens))

    plain, body, everything = (logits(), logits("model.quantize=int8"),
                               logits("model.quantize=int8", "model.quantize_output=true"))
    assert not np.allclose(plain, body, atol=1e-6) and not np.allclose(body, everything,
                                                                        atol=1e-6)
    with pytest.raises(ConfigError, match="model.quantize"):
        make_config("tiny", "model.quantize=int4")


# --- int8/int4 weights for generation and evaluation ---------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 40 steps on the built-in corpus: its run directory."""
    from maxgpt import loop

    run_dir = tmp_path_factory.mktemp("quantized") / "run"
    cfg = make_config("tiny", "data.source=builtin", "model.vocab_size=512", "train.steps=40",
                      "train.batch_size=8", "train.seq_len=64", "train.eval_every=0",
                      "train.eval_steps=4", "data.num_workers=0", "optim.lr=3e-3")
    loop.run(cfg, run_dir, echo=False)
    return run_dir


def test_quantized_weights_evaluate_close_to_full_precision_and_are_saved_by_the_run(
        trained, monkeypatch):
    """Held-out loss of int8 (per channel) and int4 (groups of 16) weights against the float
    checkpoint (measured here: +0.001% and +0.05%); the quantized weights are written to
    RUN/quantized/ on first use and read back after, without quantizing again."""
    from maxgpt import inference

    full = inference.evaluate_checkpoint(trained)
    int8 = inference.evaluate_checkpoint(trained, quantize=("int8", 0))
    int4 = inference.evaluate_checkpoint(trained, quantize=("int4", 16))
    assert int8["eval_tokens"] == int4["eval_tokens"] == full["eval_tokens"]
    assert abs(int8["eval_loss"] / full["eval_loss"] - 1) < 0.005
    assert abs(int4["eval_loss"] / full["eval_loss"] - 1) < 0.03
    assert int4["eval_loss"] != full["eval_loss"] != int8["eval_loss"]
    assert int4["weight_bytes"] < int8["weight_bytes"]
    assert (trained / "quantized" / "step-40-int8-g0").is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again instead of read")

    monkeypatch.setattr(quantize, "quantize_weights", refuse)
    assert inference.evaluate_checkpoint(trained, quantize=("int8", 0)) == int8


@pytest.mark.parametrize("kind,group,preset", [("int8", 0, "tiny"), ("int4", 16, "tiny-moe")])
def test_decoding_with_quantized_weights_equals_their_full_forward_pass(kind, group, preset):
    """The KV-cache decoder on quantized weights (attention, MLP and expert matmuls): the
    prefill's and the next step's logits are the full forward pass's of the same quantized
    model, so the cache adds no error of its own."""
    from flax import nnx

    from maxgpt.generate import init_cache
    from maxgpt.model import Transformer
    from tests.test_generate import PROMPTS
    from tests.test_model import randomized

    cfg = make_config(preset)
    model, _ = randomized(Transformer(cfg.model, nnx.Rngs(0)), std=0.2)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    names = sharding.param_names(state)
    mesh = sharding.make_mesh(make_config(preset, "mesh.data=1").mesh, ONE)
    with jax.set_mesh(mesh):
        placed = sharding.param_shardings(names, params, mesh)
        qparams, _ = quantize.quantize_weights(jax.device_put(params, placed), names, placed,
                                               kind, group)
    leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, quantize.QArray))
    assert sum(isinstance(x, quantize.QArray) for x in leaves) == 7  # q k v o up gate down
    # `maxgpt params` counts without quantizing what quantizing gives
    assert quantize.weight_bytes(qparams) == quantize.planned_bytes(params, names, kind, group)
    assert quantize.planned_bytes(params, names, None) == quantize.weight_bytes(params)
    qmodel = nnx.merge(graphdef, qparams)
    tokens = jnp.asarray([PROMPTS[0]])
    positions = jnp.arange(tokens.shape[1])[None]
    logits, cache = qmodel.decode(tokens, positions, init_cache(cfg.model, 1, 12))
    full = qmodel(jnp.concatenate([tokens, jnp.asarray([[42]])], axis=1))
    np.testing.assert_allclose(logits, full[:, :-1], rtol=1e-5, atol=1e-5)
    step, _ = qmodel.decode(jnp.asarray([[42]]), jnp.asarray([[tokens.shape[1]]]), cache)
    np.testing.assert_allclose(step[0, 0], full[0, -1], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(qmodel(tokens)) - np.asarray(model(tokens))).max() > 1e-4


def test_an_int8_kv_cache_is_close_to_the_float_cache():
    """The int8 KV cache (a scale per token and head) on its own, float weights: prefill and
    next-step logits within 2% of the largest logit of the float cache's (measured: 0.62%),
    not equal to them, and a quarter of the cache's bytes plus the scales."""
    from flax import nnx

    from maxgpt.generate import init_cache
    from maxgpt.model import Transformer
    from tests.test_generate import PROMPTS
    from tests.test_model import randomized

    cfg = make_config("tiny", "model.attention_window=5").model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.2)
    tokens = jnp.asarray([PROMPTS[0]])
    positions = jnp.arange(tokens.shape[1])[None]
    outs = {}
    for kind in ("model", "int8"):
        cache = init_cache(cfg, 1, 12, kind)
        logits, cache = model.decode(tokens, positions, cache)
        step, cache = model.decode(jnp.asarray([[42]]), jnp.asarray([[tokens.shape[1]]]), cache)
        outs[kind] = np.concatenate([np.asarray(logits[0]), np.asarray(step[0])])
        outs[kind + "_bytes"] = sum(x.nbytes for x in jax.tree.leaves(cache))
    scale = np.abs(outs["model"]).max()
    error = np.abs(outs["int8"] - outs["model"]).max() / scale
    assert 0 < error < 0.02, error
    assert outs["int8_bytes"] < 0.4 * outs["model_bytes"]


def test_int8_greedy_text_equals_full_precision(trained):
    """On the trained model, greedy continuations with int8 weights, and with an int8 KV
    cache, are the float model's."""
    from maxgpt import inference
    from maxgpt.data.tokenizer import BOS_ID
    from maxgpt.generate import generate

    prompts = ["import os\n", "def main(", "class ", "    return "]
    rows = {}
    for q in (None, ("int8", 0)):
        trainer, params, corpus, _ = inference.load_for_inference(trained, quantize=q)
        ids = [[BOS_ID, *corpus.tokenizer.encode(p)] for p in prompts]
        with jax.set_mesh(trainer.mesh):
            rows[q] = generate(trainer.graphdef, trainer.natural_params(params),
                               trainer.cfg.model, ids, max_new_tokens=12, temperature=0)
        if q is None:
            with jax.set_mesh(trainer.mesh):
                rows["int8 cache"] = generate(trainer.graphdef, params, trainer.cfg.model,
                                              ids, max_new_tokens=12, temperature=0,
                                              kv_cache="int8")
    assert rows[None] == rows[("int8", 0)] == rows["int8 cache"]


def test_generation_tasks_decode_with_the_quantized_weights_and_int8_cache(trained, capsys,
                                                                          monkeypatch):
    """`maxgpt eval --tasks` (lm-eval's generate_until) with `--quantize int8 --kv-cache
    int8`: its decoder is given the int8 cache, and on the trained model continues every
    prompt as the float model with the float cache does."""
    pytest.importorskip("lm_eval", reason="needs the [eval] extra")
    from maxgpt import cli, scoring
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    calls, original = [], scoring.generate

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["kv_cache"], out))
        return out

    monkeypatch.setattr(scoring, "generate", recorded)
    scores = {}
    for flags in ([], ["--quantize", "int8", "--kv-cache", "int8"]):
        calls.clear()
        assert cli.main(["eval", "--run-dir", str(trained), "--tasks", "maxgpt_tiny_gen",
                         "eval.include_path=tests/lm_eval_tasks", *flags]) == 0
        scores[bool(flags)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert calls and {kind for kind, _ in calls} == {"int8" if flags else "model"}
        texts = [out for _, out in calls]
        if not flags:
            plain = texts
    assert texts == plain and scores[True] == scores[False]
    assert sum(len(row) for out in plain for row in out) > 8  # tokens were generated
    # held-out loss reads no cache: the flag is refused there
    assert cli.main(["eval", "--run-dir", str(trained), "--kv-cache", "int8"]) == 2
    assert "--kv-cache is for generation" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--quantize", "int3"], "--quantize must be one of int8, int4, got 'int3'"),
    (["--quantize", "int4", "--quantize-group", "24"],
     "--quantize-group=24 must divide every width"),
    (["--quantize-group", "16"], "--quantize-group needs --quantize"),
])
def test_bad_quantization_flags_are_one_line_errors(trained, capsys, flags, message):
    from maxgpt import cli

    assert cli.main(["generate", "--run-dir", str(trained), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
