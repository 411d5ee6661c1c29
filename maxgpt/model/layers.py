"""Building blocks shared by the decoder: norms, rotary embeddings, the MLP, dropout.

Shape letters: B batch, T sequence, D embed, N query heads, K kv heads, H head dim,
F mlp hidden, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxgpt import quantize
from maxgpt.config import ModelConfig
from maxgpt.sharding import constrain, param

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


@jax.custom_vjp
def _matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:  # (M, K) @ (K, N)
    return jnp.dot(x, w)


def _matmul_2d_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_2d_bwd(residuals, dy):
    # The textbook matmul gradient, written out so that the weight gradient transposes the
    # input x (M x K, the smaller side) rather than the upstream gradient. Left to autodiff,
    # XLA:CPU fused a transpose of dy into the preceding elementwise op and the MLP backward
    # took 0.61 s instead of 0.42 s at the benchmark shape (benchmarks/, docs/benchmarks.md).
    x, w = residuals
    return jnp.dot(dy, w.T), jnp.dot(x.T, dy)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: jax.Array, w: jax.Array | quantize.QArray, contract: int = 1,
           quant: str = "none") -> jax.Array:
    """Contract the last `contract` axes of x with the first `contract` axes of w.

    E.g. (B, T, D) x (D, N, H) -> (B, T, N, H), or (B, T, N, H) x (N, H, D) -> (B, T, D) with
    contract=2. Every weight matmul of the model goes through here, in the compute dtype:
    `quant` int8 | fp8 quantizes both operands (model.quantize, maxgpt/quantize.py); a
    quantized weight (a QArray, for inference) is used as it is.
    """
    lead, k_shape = x.shape[:-contract], x.shape[-contract:]
    assert k_shape == w.shape[:contract], (x.shape, w.shape)
    out_shape = w.shape[contract:]
    k, n = math.prod(k_shape), math.prod(out_shape)
    x2 = x.reshape(-1, k)
    if isinstance(w, quantize.QArray):
        y = quantize.weight_dot(x2, w.reshape(k, n))
    elif quant != "none":
        y = quantize.dot(x2, w.astype(x.dtype).reshape(k, n), quant)
    else:
        y = _matmul_2d(x2, w.astype(x.dtype).reshape(k, n))
    return y.reshape(*lead, *out_shape)


class Norm(nnx.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), statistics in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        pdt = jnp.dtype(cfg.param_dtype)
        self.scale = param(rngs, ones, (cfg.embed_dim,), ("norm",), pdt)
        # LayerNorm carries a bias when the model has biases (GPT-1/2/3); RMSNorm never does.
        has_bias = cfg.norm == "layernorm" and cfg.use_bias
        self.bias = param(rngs, zeros, (cfg.embed_dim,), ("norm",), pdt) if has_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D)
        y = x.astype(jnp.float32)
        if self.kind == "layernorm":
            y = y - y.mean(-1, keepdims=True)
        y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split layout as in Hugging Face Llama.

    x: (B, T, N, H); positions: (B, T) per-token positions (restart at each packed document).
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angle = positions.astype(jnp.float32)[..., None] * freq  # (B, T, H/2)
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (eval) or the rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class MLP(nnx.Module):
    """GELU MLP (GPT-1/2/3, tanh approximation as in GPT-2) or SwiGLU (Shazeer 2020; Llama)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int | None = None):
        D, F, pdt = cfg.embed_dim, width or cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        self.kind, self.dtype, self.quant = cfg.mlp, jnp.dtype(cfg.dtype), cfg.quantize
        init = normal(cfg.init_std)
        # GPT-2: residual-path projections scaled by 1/sqrt(2 * num_layers) at init.
        out_init = normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        swiglu = cfg.mlp == "swiglu"

        def bias(shape, axes, wanted=True):
            return param(rngs, zeros, shape, axes, pdt) if cfg.use_bias and wanted else None

        self.up_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
        self.gate_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt) if swiglu else None
        self.down_proj = param(rngs, out_init, (F, D), ("mlp", "embed"), pdt)
        self.up_bias = bias((F,), ("mlp",))
        self.gate_bias = bias((F,), ("mlp",), wanted=swiglu)
        self.down_bias = bias((D,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> (B, T, D)
        dt = self.dtype
        h = matmul(x, self.up_proj[...], quant=self.quant)  # (B, T, F)
        if self.up_bias is not None:
            h = h + self.up_bias[...].astype(dt)
        if self.kind == "swiglu":
            gate = matmul(x, self.gate_proj[...], quant=self.quant)
            if self.gate_bias is not None:
                gate = gate + self.gate_bias[...].astype(dt)
            h = jax.nn.silu(gate) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        h = constrain(h, ("batch", "seq", "mlp"))
        y = matmul(h, self.down_proj[...], quant=self.quant)  # (B, T, D)
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(dt)
        return y
