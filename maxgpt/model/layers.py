"""Building blocks shared by the decoder: norms, rotary embeddings, the MLP, dropout.

Shape letters: B batch, T sequence, D embed, N query heads, K kv heads, H head dim,
F mlp hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxgpt.config import ModelConfig
from maxgpt.sharding import constrain, param

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def dtype_of(name: str):
    return jnp.dtype(name)


class Norm(nnx.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019), statistics in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        pdt = dtype_of(cfg.param_dtype)
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

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, pdt = cfg.embed_dim, cfg.mlp_dim, dtype_of(cfg.param_dtype)
        self.kind, self.dtype = cfg.mlp, dtype_of(cfg.dtype)
        init = normal(cfg.init_std)
        # GPT-2: residual-path projections scaled by 1/sqrt(2 * num_layers) at init.
        out_init = normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        self.up_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
        self.gate_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt) if cfg.mlp == "swiglu" else None
        self.down_proj = param(rngs, out_init, (F, D), ("mlp", "embed"), pdt)
        bias = lambda shape, axes: param(rngs, zeros, shape, axes, pdt) if cfg.use_bias else None
        self.up_bias = bias((F,), ("mlp",))
        self.gate_bias = bias((F,), ("mlp",)) if cfg.mlp == "swiglu" else None
        self.down_bias = bias((D,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> (B, T, D)
        dt = self.dtype
        h = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
        if self.up_bias is not None:
            h = h + self.up_bias[...].astype(dt)
        if self.kind == "swiglu":
            gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
            if self.gate_bias is not None:
                gate = gate + self.gate_bias[...].astype(dt)
            h = jax.nn.silu(gate) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        h = constrain(h, ("batch", "seq", "mlp"))
        y = jnp.einsum("BTF,FD->BTD", h, self.down_proj[...].astype(dt))
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(dt)
        return y
