"""Context parallelism: sequences split over the `context` mesh axis (sharding.balanced_order,
model/attention.py, maxgpt/loss.py) train exactly as the unsplit model on one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxgpt import sharding
from maxgpt.model import attention
from maxgpt.model.transformer import Transformer
from tests import reference as ref
from tests.conftest import make_config
from tests.test_train import run

ONE = jax.devices()[:1]
# packed documents and padding (no held-out evaluation: its rows carry no train loss)
TEXT = ("data.source=builtin", "model.vocab_size=512", "train.eval_every=0")


def losses(*overrides, devices=None, preset="tiny"):
    return run(*overrides, devices=devices, preset=preset)[0]


def test_balanced_order_gives_every_device_the_same_causal_work():
    """With C devices, 2C chunks, device i holding chunks i and 2C - 1 - i: every device's
    queries see the same number of keys; in plain order the last sees 2C - 1 times the
    first's."""
    T, C = 64, 4
    mesh = sharding.make_mesh(make_config("tiny", "mesh.context=4", "mesh.data=2").mesh)
    with jax.set_mesh(mesh):
        order = sharding.balanced_order(T)
    assert sorted(order) == list(range(T))
    work = lambda queries: int((np.asarray(queries)[:, None] >= np.arange(T)).sum())  # noqa
    balanced = [work(part) for part in np.split(order, C)]
    plain = [work(part) for part in np.split(np.arange(T), C)]
    assert len(set(balanced)) == 1 and plain[-1] / plain[0] > 5
    assert sharding.balanced_order(T) is None  # outside a mesh with a context axis


@pytest.mark.parametrize("window", [0, 3])
def test_a_mask_in_another_order_is_the_permuted_mask(window):
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 12], np.int32)
    order = np.random.default_rng(0).permutation(12)
    natural = attention.Mask(jnp.asarray(segments), window).dense()
    moved = attention.Mask(jnp.asarray(segments[:, order]), window, order).dense()
    np.testing.assert_array_equal(moved, np.asarray(natural)[:, order][:, :, order])
    np.testing.assert_array_equal(natural, ref.explicit_mask(segments, window))


@pytest.fixture(scope="module")
def one_device():
    return losses("mesh.data=1", devices=ONE)


def test_context_and_fsdp_equal_one_device(one_device):
    """context=2 x fsdp=4: the sequence halves and the parameters (split along the width
    over both axes, as FSDP does); and the cross-entropy in pieces of 4 positions per
    device."""
    np.testing.assert_allclose(losses("mesh.context=2", "mesh.fsdp=4", "mesh.data=1"),
                               one_device, rtol=2e-5)
    np.testing.assert_allclose(losses("mesh.context=2", "mesh.data=4", "train.loss_chunk=4"),
                               one_device, rtol=2e-5)


def test_context_and_tensor_with_packed_documents_and_gqa():
    """context=4 x tensor=2 on packed text (several documents per row, padding), 4 query
    heads sharing 2 kv heads."""
    expected = losses(*TEXT, "mesh.data=1", devices=ONE)
    got = losses(*TEXT, "mesh.context=4", "mesh.tensor=2", "mesh.data=1")
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_context_with_gpt3_banded_layers():
    """GPT-3's alternating dense and banded layers (learned positions, biases, LayerNorm)."""
    banded = ("model.attention_window=8", "model.window_pattern=alternate")
    expected = losses(*banded, "mesh.data=1", devices=ONE, preset="tiny-gpt2")
    got = losses(*banded, "mesh.context=2", "mesh.data=4", preset="tiny-gpt2")
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_context_through_pipeline_stages(one_device):
    """Both new axes at once: stage=2 x context=2 x fsdp=2."""
    np.testing.assert_allclose(
        losses("mesh.stage=2", "mesh.context=2", "mesh.fsdp=2", "mesh.data=1"), one_device,
        rtol=2e-5)


def test_splash_kernel_under_context_parallelism(monkeypatch):
    """The splash kernel (Pallas interpret mode on CPU) with queries in the balanced order
    on context=2 x tensor=2, the kernel's block tables split with the queries, against the
    XLA path on one device in natural order: packed documents, padding, GQA, and GPT-3's
    alternating full and banded layers (windows crossing the chunks). Loss and gradients."""
    monkeypatch.setattr(attention, "SPLASH_BLOCK", 128)
    T = 512  # chunks of 128 = one kernel block
    run_cfg = make_config("tiny", f"model.max_seq_len={T}", "model.attention_window=150",
                          "model.window_pattern=alternate", "mesh.data=1", "mesh.context=2",
                          "mesh.tensor=2", "model.attention=xla")
    xla = Transformer(run_cfg.model, nnx.Rngs(0))
    splash = Transformer(dataclasses.replace(run_cfg.model, attention="splash"), nnx.Rngs(1))
    nnx.update(splash, nnx.state(xla))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, T)), jnp.int32)
    segments = np.ones((2, T), np.int32)
    segments[1] = [1] * 200 + [2] * 190 + [0] * 122
    positions = np.stack([np.arange(T), [*range(200), *range(190), *range(122)]])
    weights = rng.normal(size=(2, T, 256)).astype(np.float32)

    def value_and_grad(model, order):
        graphdef, params = nnx.split(model)
        take = (lambda a: a) if order is None else (lambda a: a[:, order])
        args = [jnp.asarray(take(a)) for a in (tokens, positions, segments, weights)]

        def loss(p):
            m = nnx.merge(graphdef, p)
            hidden, _ = m.hidden(*args[:3], None, order)
            return (m.logits(hidden)[..., :256] * args[3] * (args[2] > 0)[..., None]).sum()

        return jax.jit(jax.value_and_grad(loss))(params)

    want, want_grads = value_and_grad(xla, None)
    with jax.set_mesh(sharding.make_mesh(run_cfg.mesh, jax.devices()[:4])):
        got, got_grads = value_and_grad(splash, sharding.balanced_order(T))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # gradients up to ~20: float32 reordering leaves differences of a few 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
                 got_grads, want_grads)
