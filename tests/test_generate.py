"""KV-cache generation against repeated full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxgpt.data.tokenizer import EOS_ID
from maxgpt.generate import generate, init_cache
from maxgpt.model import Transformer
from tests.conftest import make_config
from tests.test_model import randomized

VARIANTS = {
    "llama-gqa-window": ("tiny", "model.attention_window=5"),  # sliding window < prompt + new
    "gpt2-learned": ("tiny-gpt2",),
    "gpt3-banded": ("tiny-gpt2", "model.attention_window=4", "model.window_pattern=alternate"),
}
PROMPTS = [[2, 17, 33, 4, 90, 12, 7], [2, 5], [2, 61, 61, 8]]  # different lengths: left padding


def model_and_params(variant):
    cfg = make_config(*VARIANTS[variant]).model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.2)
    graphdef, state = nnx.split(model)
    return cfg, model, graphdef, nnx.to_pure_dict(state)


def greedy_without_cache(model, prompt, steps):
    """The reference: the whole sequence through the model again for every new token."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(jnp.asarray([tokens]))
        logits = logits.at[..., EOS_ID].set(-jnp.inf)
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_repeated_full_forward(variant):
    cfg, model, graphdef, params = model_and_params(variant)
    got = generate(graphdef, params, cfg, PROMPTS, max_new_tokens=9, temperature=0,
                   min_new_tokens=9)
    for prompt, row in zip(PROMPTS, got):
        assert row == greedy_without_cache(model, prompt, 9)


@pytest.mark.parametrize("variant", [
    ("tiny", "model.attention_window=5"),
    ("tiny-moe", "model.moe_every=2"),  # a dense layer, then an MoE one: two stacks to scan
])
def test_prefill_logits_equal_the_forward_pass(variant):
    cfg = make_config(*variant).model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.2)
    tokens = jnp.asarray([PROMPTS[0]])
    positions = jnp.arange(tokens.shape[1])[None]
    logits, cache = model.decode(tokens, positions, init_cache(cfg, 1, 12))
    np.testing.assert_allclose(logits, model(tokens), rtol=1e-5, atol=1e-5)
    assert int(cache["start"]) == tokens.shape[1]
    step, _ = model.decode(jnp.asarray([[42]]), jnp.asarray([[tokens.shape[1]]]), cache)
    full = model(jnp.concatenate([tokens, jnp.asarray([[42]])], axis=1))
    np.testing.assert_allclose(step[0, 0], full[0, -1], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_for_a_seed():
    cfg, _, graphdef, params = model_and_params("gpt2-learned")

    def draw(seed, **kw):
        return generate(graphdef, params, cfg, PROMPTS, max_new_tokens=12, temperature=1.0,
                        seed=seed, min_new_tokens=12, **kw)

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert draw(3, top_k=1) == generate(graphdef, params, cfg, PROMPTS, max_new_tokens=12,
                                        temperature=0, min_new_tokens=12)  # top-1 is greedy
    assert draw(5, top_p=1e-6) == draw(6, top_p=1e-6)  # a tiny nucleus: the argmax only


@pytest.mark.parametrize("preset, mesh", [
    ("tiny", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),
    # 4 rows cannot split 8 ways: each expert-axis pair holds the same rows
    ("tiny-moe", ("mesh.data=2", "mesh.fsdp=2", "mesh.expert=2")),
])
def test_generation_runs_on_a_sharded_mesh(preset, mesh):
    """Parameters in their shards, the cache sharded like the activations."""
    from maxgpt import sharding, train

    cfg = make_config(preset, *mesh)
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh))
    state = train.init_state(trainer)
    prompts = PROMPTS + [[2, 3]]  # 4 rows: the batch divides over data x fsdp
    with jax.set_mesh(trainer.mesh):
        sharded = generate(trainer.graphdef, state["params"], cfg.model, prompts,
                           max_new_tokens=5, temperature=0, min_new_tokens=5)
    single = generate(trainer.graphdef, jax.device_get(state["params"]), cfg.model, prompts,
                      max_new_tokens=5, temperature=0, min_new_tokens=5)
    assert sharded == single
