"""The decoder against naive float64 references (tests/reference.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxgpt.model import Transformer, attention
from maxgpt.model.attention import (CPU_QUERY_BLOCK, Attention, Mask, attention_mask,
                                    causal_attention, window_mask)
from maxgpt.model.layers import MLP, Norm, matmul, rope
from maxgpt.sharding import make_mesh
from tests import reference as ref
from tests.conftest import make_config


def randomized(module, seed=0, std=0.3):
    """The module with every parameter redrawn (init zeros and ones would hide bugs)."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pure = treedef.unflatten([std * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])
    return nnx.merge(graphdef, pure), jax.tree.map(np.asarray, pure)


def packed_batch(B=2, T=12, vocab=256, seed=0):
    """Two rows: one document, and three packed documents of lengths 5, 4, 3."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T))
    segments = np.ones((B, T), np.int32)
    segments[1] = [1] * 5 + [2] * 4 + [3] * 3
    positions = np.stack([np.arange(T), [*range(5), *range(4), *range(3)]])
    return tokens, positions, segments


def close(a, b, tol=2e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# Structural variants: each row changes the options one published model family uses.
VARIANTS = {
    "llama-gqa": ("tiny",),
    "mha": ("tiny", "model.num_kv_heads=4"),
    "mqa": ("tiny", "model.num_kv_heads=1"),
    "mistral-window": ("tiny", "model.attention_window=3"),
    "gpt2": ("tiny-gpt2",),
    "gpt1-postnorm": ("tiny-gpt2", "model.norm_position=post"),
    "gpt3-banded": ("tiny-gpt2", "model.attention_window=4", "model.window_pattern=alternate",
                    "model.num_layers=3"),
    "rmsnorm-bias-untied": ("tiny", "model.use_bias=true", "model.tie_embeddings=true"),
}


@pytest.mark.parametrize("x_shape, w_shape, contract, spec", [
    ((2, 3, 4), (4, 5), 1, "btd,df->btf"),
    ((2, 3, 4), (4, 2, 5), 1, "btd,dnh->btnh"),
    ((2, 3, 2, 5), (2, 5, 4), 2, "btnh,nhd->btd"),
])
def test_matmul_and_its_gradient_equal_einsum(x_shape, w_shape, contract, spec):
    """matmul has a hand-written VJP; autodiff of a plain einsum is the reference."""
    kx, kw, kr = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    r = jax.random.normal(kr, jnp.einsum(spec, x, w).shape)
    ours = jax.value_and_grad(lambda x, w: (matmul(x, w, contract) * r).sum(), (0, 1))(x, w)
    reference = jax.value_and_grad(lambda x, w: (jnp.einsum(spec, x, w) * r).sum(), (0, 1))(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 ours, reference)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm(kind):
    cfg = make_config("tiny-gpt2", f"model.norm={kind}").model
    norm, p = randomized(Norm(cfg, nnx.Rngs(0)))
    x = np.random.default_rng(1).normal(size=(2, 5, cfg.embed_dim)).astype(np.float32)
    close(norm(jnp.asarray(x)), ref.norm(p, ref.f64(x), cfg), 1e-5)


def test_rope_is_a_rotation_by_position():
    x = np.random.default_rng(0).normal(size=(2, 6, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 7]])
    close(rope(jnp.asarray(x), jnp.asarray(positions), 10000.0),
          ref.rope(ref.f64(x), positions, 10000.0), 1e-5)


@pytest.mark.parametrize("window", [0, 1, 3, 7])
def test_masks_equal_explicit_masks(window):
    _, _, segments = packed_batch()
    built = window_mask(attention_mask(jnp.asarray(segments)), window)
    np.testing.assert_array_equal(built, ref.explicit_mask(segments, window))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_matches_naive(kv_heads, bias):
    cfg = make_config("tiny", f"model.num_kv_heads={kv_heads}", f"model.use_bias={bias}").model
    attn, p = randomized(Attention(cfg, nnx.Rngs(0)), std=0.15)
    tokens, positions, segments = packed_batch()
    x = np.random.default_rng(2).normal(size=(*tokens.shape, cfg.embed_dim)).astype(np.float32)
    mask = ref.explicit_mask(segments, window=4)
    got = attn(jnp.asarray(x), Mask(jnp.asarray(segments), 4), jnp.asarray(positions))
    close(got, ref.attention(p, ref.f64(x), mask, positions, cfg))


@pytest.mark.parametrize("window", [0, 100])
def test_blocked_causal_attention_matches_naive(window):
    """Sequences longer than one CPU query block: blocks, documents and windows interact."""
    T = 2 * CPU_QUERY_BLOCK
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, T, n, 8)).astype(np.float32) for n in (4, 2, 2))
    segments = np.ones((2, T), np.int32)
    segments[1, 100:] = 2  # a document boundary inside the first block
    segments[1, 200:] = 3  # and one inside the second
    mask = ref.explicit_mask(segments, window)
    got = causal_attention(*(jnp.asarray(a) for a in (q, k, v)), jnp.asarray(mask))
    close(got, ref.attention_core(*(ref.f64(a) for a in (q, k, v)), mask), 1e-5)
    # gradients: against XLA's attention over the whole (unblocked) mask
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    grads = [jax.grad(lambda *qkv: (attend(*qkv, jnp.asarray(mask)) * cotangent).sum(),
                      (0, 1, 2))(*(jnp.asarray(a) for a in (q, k, v)))
             for attend in (causal_attention, lambda q, k, v, m: jax.nn.dot_product_attention(
                 q, k, v, mask=m[:, None]))]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_mlp_matches_naive(kind):
    cfg = make_config("tiny-gpt2", f"model.mlp={kind}").model
    mlp, p = randomized(MLP(cfg, nnx.Rngs(0)), std=0.15)
    x = np.random.default_rng(3).normal(size=(2, 5, cfg.embed_dim)).astype(np.float32)
    close(mlp(jnp.asarray(x)), ref.mlp(p, ref.f64(x), cfg))


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_matches_naive_reference(variant):
    cfg = make_config(*VARIANTS[variant]).model
    model, p = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    tokens, positions, segments = packed_batch(vocab=cfg.vocab_size)
    got = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    close(got, ref.forward(p, tokens, cfg, positions, segments), 5e-4)


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt3-banded", "gpt1-postnorm"])
def test_scan_equals_unrolled_loop(variant):
    cfg = make_config(*VARIANTS[variant]).model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    tokens, positions, segments = (jnp.asarray(a) for a in packed_batch(vocab=cfg.vocab_size))
    scanned = model(tokens, positions, segments)

    # The same computation with a Python loop over the stacked layers.
    x = model.embed[...][tokens]
    if model.pos_embed is not None:
        x = x + model.pos_embed[...][positions]
    graphdef, stacked = nnx.split(model.blocks)
    for i, window in enumerate(cfg.layer_windows()):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x, _, _ = block(x, Mask(segments, window), positions)
    if model.final_norm is not None:
        x = model.final_norm(x)
    head = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]
    np.testing.assert_allclose(scanned, x @ head, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2"])
def test_changing_one_packed_document_never_changes_another(variant):
    cfg = make_config(*VARIANTS[variant]).model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    tokens, positions, segments = packed_batch(vocab=cfg.vocab_size)
    base = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))

    changed = tokens.copy()
    changed[1, 5:9] = (changed[1, 5:9] + 1) % cfg.vocab_size  # rewrite document 2 only
    out = np.asarray(model(jnp.asarray(changed), jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_array_equal(out[1, :5], base[1, :5])  # document 1: bit for bit
    np.testing.assert_array_equal(out[1, 9:], base[1, 9:])  # document 3: bit for bit
    assert np.abs(out[1, 5:9] - base[1, 5:9]).max() > 1e-3
    np.testing.assert_array_equal(out[0], base[0])  # the other row

    # Positions restart per document: document 3 packed equals document 3 alone.
    alone = model(jnp.asarray(tokens[1:, 9:]))
    np.testing.assert_allclose(base[1, 9:], alone[0], rtol=1e-5, atol=1e-5)


def grads_of(model_cfg, tokens):
    model, p = randomized(Transformer(model_cfg, nnx.Rngs(0)), std=0.1)
    graphdef, _ = nnx.split(model)

    def loss(params):
        return nnx.merge(graphdef, params)(tokens).mean()

    return jax.jit(jax.grad(loss))(p)


def test_remat_policies_change_memory_not_gradients():
    cfg = make_config("tiny").model
    tokens = jnp.asarray(packed_batch()[0])
    expected = grads_of(cfg, tokens)
    for policy in ("dots", "dots_offload", "full"):
        got = grads_of(make_config("tiny", f"model.remat={policy}").model, tokens)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, expected)


def test_bf16_compute_with_fp32_master_weights():
    cfg32 = make_config("tiny").model
    cfg16 = make_config("tiny", "model.dtype=bfloat16").model
    model16, p = randomized(Transformer(cfg16, nnx.Rngs(0)), std=0.1)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p))
    graphdef32, _ = nnx.split(Transformer(cfg32, nnx.Rngs(0)))
    tokens = jnp.asarray(packed_batch()[0])
    out16, out32 = model16(tokens), nnx.merge(graphdef32, p)(tokens)
    assert out16.dtype == jnp.float32  # logits always leave the model in fp32
    err = np.abs(np.asarray(out16) - np.asarray(out32)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(out32)).max()  # bf16-sized, not zero, not wild


def test_dropout_is_keyed_and_off_without_a_key():
    cfg = make_config("tiny", "model.dropout=0.5").model
    model, _ = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    tokens = jnp.asarray(packed_batch()[0])
    plain = make_config("tiny").model
    graphdef, state = nnx.split(model)
    eval_out = nnx.merge(nnx.split(Transformer(plain, nnx.Rngs(0)))[0], state)(tokens)
    np.testing.assert_array_equal(model(tokens), eval_out)  # no key: no dropout
    a = model(tokens, dropout_key=jax.random.key(1))
    b = model(tokens, dropout_key=jax.random.key(1))
    c = model(tokens, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(eval_out)).max() > 1e-3


def test_padded_vocabulary_rows_are_never_predicted():
    """vocab 200 is stored as 256 rows (a multiple of 128); ids 200.. get probability 0 and
    the distribution over real ids equals an unpadded model's with the same weights."""
    cfg = make_config("tiny", "model.vocab_size=200").model
    model, p = randomized(Transformer(cfg, nnx.Rngs(0)), std=0.1)
    assert p["embed"].shape[0] == 256 and p["lm_head"].shape[1] == 256
    tokens, positions, segments = packed_batch(vocab=200)
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(segments)), np.float64)
    assert logits.shape[-1] == 256 and np.all(logits[..., 200:] == -1e9)
    unpadded = dict(p, embed=p["embed"][:200], lm_head=p["lm_head"][:, :200])
    close(logits[..., :200], ref.forward(unpadded, tokens, cfg, positions, segments), 5e-4)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    assert probs[..., 200:].max() == 0.0


@pytest.mark.parametrize("variant, mesh", [
    ("gpt3-banded", None),  # one device; full and banded layers: a kernel per window
    ("llama-gqa", ("mesh.data=2", "mesh.tensor=2")),  # heads and kv heads split over tensor
    ("mqa", ("mesh.data=2", "mesh.tensor=2")),  # one kv head: heads kept whole per device
])
def test_splash_kernel_equals_xla_attention(variant, mesh, monkeypatch):
    """The Pallas splash kernel (Pallas's interpret mode on CPU, the TPU kernel's code) in
    the whole model, 128-token blocks over 256 tokens: logits equal the XLA path with packed
    documents, padding, GQA/MQA and alternating windows that cross blocks; gradients too."""
    monkeypatch.setattr(attention, "SPLASH_BLOCK", 128)
    T = 256
    overrides = (*VARIANTS[variant][1:], f"model.max_seq_len={T}")
    if variant == "gpt3-banded":
        overrides += ("model.attention_window=150",)
    run_cfg = make_config(VARIANTS[variant][0], *overrides, *(mesh or ("mesh.data=1",)),
                          "model.attention=xla")
    xla_cfg = run_cfg.model
    splash_cfg = dataclasses.replace(xla_cfg, attention="splash")
    xla_model, _ = randomized(Transformer(xla_cfg, nnx.Rngs(0)), std=0.1)
    splash_model = Transformer(splash_cfg, nnx.Rngs(1))
    nnx.update(splash_model, nnx.state(xla_model))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, xla_cfg.vocab_size, (2, T)), jnp.int32)
    segments = np.ones((2, T), np.int32)
    segments[1] = [1] * 100 + [2] * 90 + [0] * 66  # two documents, then padding
    positions = np.stack([np.arange(T), [*range(100), *range(90), *range(66)]])
    segments, positions = jnp.asarray(segments), jnp.asarray(positions, jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, T, xla_cfg.padded_vocab_size)), jnp.float32)

    def value_and_grad(model):
        graphdef, params = nnx.split(model)
        fn = jax.value_and_grad(lambda p: (nnx.merge(graphdef, p)(tokens, positions, segments)
                                           * weights * (segments > 0)[..., None]).sum())
        if mesh is None:
            return jax.jit(fn)(params)
        with jax.set_mesh(make_mesh(run_cfg.mesh, jax.devices()[:4])):
            return jax.jit(fn)(params)

    (got, got_grads), (want, want_grads) = value_and_grad(splash_model), value_and_grad(
        xla_model)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, want_grads)


def test_cudnn_wiring_equals_our_mask():
    """model.attention=cudnn hands causality and the window to jax.nn.dot_product_attention as
    is_causal / local_window_size, and the packed documents as a mask. cuDNN itself needs a
    GPU (not tested here); the same call through XLA's implementation checks that wiring
    against our dense mask: GQA, two documents and padding, full and windowed layers, and a
    traced window switching between them (GPT-3's alternating layers)."""
    B, T, N, K, H = 2, 24, 4, 2, 8
    q, k, v = (jax.random.normal(key, (B, T, n, H)) for key, n in
               zip(jax.random.split(jax.random.key(0), 3), (N, K, K)))
    segments = jnp.asarray([[1] * T, [1] * 10 + [2] * 9 + [0] * 5], jnp.int32)
    kv = (jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2))
    for windows, window in (((0,), 0), ((5,), 5), ((0, 5), jnp.asarray(5)),
                            ((0, 5), jnp.asarray(0))):
        mask = attention.Mask(segments, window)
        got = attention.cudnn_attention(q, k, v, mask, windows, implementation="xla")
        want = attention.causal_attention(q, *kv, mask.dense())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
