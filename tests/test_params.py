"""Parameter counts against published numbers, and the FLOP accounting used for MFU."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from maxgpt.config import load_config
from maxgpt.flops import flops_per_token, matmul_params_per_token, mean_visible_keys
from maxgpt.train import abstract_model, count_params
from tests.conftest import REPO, make_config

# Published totals: GPT-1 (Radford et al. 2018), GPT-2 XL as released on the Hugging Face hub
# (1,557,611,200; the paper's "1542M" undercounts), GPT-3 (Brown et al. 2020), Llama 3 (Meta
# model cards: 8.03B, 70.6B, 405B), Mistral 7B (7.24B, Jiang et al. 2023).
PUBLISHED = {
    "gpt1": 117e6, "gpt2-small": 124.44e6, "gpt2-xl": 1.5576e9, "gpt3-small": 125e6,
    "gpt3-medium": 350e6, "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13e9, "gpt3-175b": 175e9, "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9, "llama3-405b": 405e9, "mistral-7b": 7.24e9,
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_parameter_counts_match_published(preset):
    total = count_params(load_config(f"{REPO}/configs/models/{preset}.yaml"))
    # GPT-3's table rounds to 2 significant digits; the others are exact to 3-4.
    tol = 0.04 if preset.startswith("gpt3") and preset != "gpt3-175b" else 0.01
    assert total == pytest.approx(PUBLISHED[preset], rel=tol)


def test_params_cli_json():
    out = subprocess.run([sys.executable, "-m", "maxgpt", "params", "--json", "--config",
                          "configs/models/llama3-8b.yaml"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    counts = json.loads(out)
    # inference weights: the matmul weights (q, o: D x D; k, v: D x 1024; up, gate, down:
    # D x F) at 1 or 1/2 byte with a float32 scale per output channel, the rest float32
    L, D, F, total = 32, 4096, 14336, 8030261248
    matmul = L * (2 * D * D + 2 * D * 1024 + 3 * D * F)
    scales = L * (D + 2 * 1024 + D + 2 * F + D)
    rest = 4 * (total - matmul) + 4 * scales
    assert counts == {"total": total, "active": total, "vocab_padding": 0,
                      "flops_per_token": flops_per_token(load_config(
                          f"{REPO}/configs/models/llama3-8b.yaml").model, 8192),
                      "seq_len": 8192, "weight_bytes": {"float32": 4 * total,
                                                        "int8": matmul + rest,
                                                        "int4": matmul // 2 + rest}}


def test_vocabulary_padding_is_excluded_from_counts_but_allocated():
    cfg = load_config(f"{REPO}/configs/models/gpt2-xl.yaml")
    assert cfg.model.padded_vocab_size == 50304  # 50257 rounded up to a multiple of 128
    allocated = sum(x.size for x in jax.tree.leaves(abstract_model(cfg)[1]))
    assert allocated - count_params(cfg) == (50304 - 50257) * 1600  # tied: one table


@pytest.mark.parametrize("seq_len, window", [(1, 0), (7, 0), (16, 4), (16, 16), (16, 40)])
def test_mean_visible_keys_counts_the_causal_mask(seq_len, window):
    brute = np.mean([sum(1 for k in range(q + 1) if window == 0 or q - k < window)
                     for q in range(seq_len)])
    assert mean_visible_keys(seq_len, window) == pytest.approx(brute)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_matmul_params_are_the_weight_matrices_a_token_meets(preset):
    cfg = make_config(preset)
    _, params = abstract_model(cfg)
    pure = nnx.to_pure_dict(params)
    matrices = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(pure)[0]
                   if path[-1].key.endswith("_proj") or path[0].key == "lm_head")
    if cfg.model.tie_embeddings:
        matrices += pure["embed"].size  # the tied table doubles as the output projection
    assert matmul_params_per_token(cfg.model) == matrices


def test_flops_per_token_gpt3_175b():
    m = load_config(f"{REPO}/configs/models/gpt3-175b.yaml").model
    N, T, D = matmul_params_per_token(m), 2048, 12288
    # 4D^2 attention + 8D^2 MLP per layer, and logits over the padded vocabulary (50304 rows)
    assert N == pytest.approx(96 * 12 * D**2 + 50304 * D)
    # Attention, forward: QK^T and AV cost 2*D each per visible key; training is 3x that.
    dense_keys = (T + 1) / 2  # causal: query i sees i + 1 keys
    band_keys = (256 * 257 / 2 + (T - 256) * 256) / T  # banded layers: at most 256 keys
    expected = 6 * N + 48 * 12 * D * dense_keys + 48 * 12 * D * band_keys
    assert flops_per_token(m, T) == pytest.approx(expected)


@pytest.mark.parametrize("preset, extra", [
    ("tiny", ()),  # GQA, SwiGLU, untied
    ("tiny", ("model.num_kv_heads=1", "model.num_layers=4")),  # MQA, deeper
    ("tiny-gpt2", ("model.attention_window=32", "model.window_pattern=alternate")),
    # capacity factor 1: the experts compute exactly k rows per token, as counted
    ("tiny-moe", ("model.moe_dispatch=capacity", "model.capacity_factor=1.0",
                  "model.mlp_dim=512")),
])
def test_flops_per_token_equals_xla_cost_analysis(preset, extra):
    """XLA's count of the compiled train step (layer loop unrolled: XLA counts a loop body
    once). XLA computes every query-key product of the masked attention, so the formula
    counts all keys here (causal=False); XLA also counts the elementwise work, softmax and
    optimizer that the convention leaves out: a few percent more."""
    from maxgpt import sharding, train

    cfg = make_config(preset, "model.unroll_layers=-1", "model.embed_dim=256",
                      "model.num_heads=4", "model.mlp_dim=1024", "model.vocab_size=512",
                      "train.batch_size=4", "train.seq_len=128", "mesh.data=1", *extra)
    trainer = train.build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    with jax.set_mesh(trainer.mesh):
        compiled = trainer.step_fn.lower(train.abstract_state(trainer),
                                         train._abstract_batch(trainer)).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = flops_per_token(cfg.model, 128, causal=False) * 4 * 128
    assert 1.0 <= xla / ours <= 1.04, xla / ours
