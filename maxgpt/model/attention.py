"""Causal self-attention: multi-head, grouped-query or multi-query; full, sliding or banded.

One code path for every variant:

- the number of kv heads K divides the number of query heads N (K == N: MHA, 1 < K < N: GQA
  as in Llama 3 / Mistral, K == 1: MQA); each kv head serves N / K query heads;
- which keys a query may see is one boolean mask: causal, same packed document (segment
  ids), and, for windowed layers, at most `window - 1` tokens back (Mistral's sliding window;
  GPT-3's locally banded layers use the same band on alternate layers);
- the softmax(QK^T)V itself is `jax.nn.dot_product_attention`. With `implementation=None`
  jax 0.10 always runs its XLA implementation; cuDNN flash attention on GPU needs
  `implementation="cudnn"`, bf16/fp16 inputs and the mask given as `is_causal` +
  `local_window_size` (+ segments as a bias), and is not wired yet: it needs a GPU to test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxgpt.config import ModelConfig
from maxgpt.model.layers import matmul, normal, rope, zeros
from maxgpt.sharding import constrain, param, platform


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids -> (B, T, T) mask: causal and within one packed document."""
    T = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_doc


def window_mask(mask: jax.Array, window: jax.Array | int) -> jax.Array:
    """Restrict a (B, T, T) causal mask to keys fewer than `window` tokens back (0: no limit)."""
    T = mask.shape[-1]
    distance = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]  # query index - key index
    return mask & ((window <= 0) | (distance < window))[None]


# XLA computes every query-key product, the masked upper triangle included. On CPU, giving
# each block of 128 queries only the keys up to its own end skips most of that triangle
# (measured at the benchmark shape in docs/benchmarks.md). Elsewhere it is unmeasured, and the
# flash kernels meant for GPU and TPU skip masked tiles themselves: one block there.
CPU_QUERY_BLOCK = 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(QK^T / sqrt(H)) V over visible keys. q: (B, T, N, H); k, v: (B, T, K, H)."""
    T = q.shape[1]
    cpu = platform() == "cpu"
    block = CPU_QUERY_BLOCK if cpu and T % CPU_QUERY_BLOCK == 0 else T
    outs = [jax.nn.dot_product_attention(q[:, start:start + block], k[:, :start + block],
                                         v[:, :start + block],
                                         mask=mask[:, None, start:start + block, :start + block])
            for start in range(0, T, block)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)  # GPT-2 residual scaling
        self.q_proj = param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = param(rngs, out_init, (N, H, D), ("heads", "head_dim", "embed"), pdt)
        if cfg.use_bias:
            self.q_bias = param(rngs, zeros, (N, H), ("heads", "head_dim"), pdt)
            self.k_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
            self.v_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
            self.o_bias = param(rngs, zeros, (D,), ("norm",), pdt)
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None

    def _project(self, x, kernel, bias, heads_axis):
        y = matmul(x, kernel[...])  # (B, T, D) x (D, heads, H)
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return constrain(y, ("batch", "seq", heads_axis, "head_dim"))

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, cache=None):
        """x: (B, T, D); mask: (B, T, T) bool, True where a query may see a key.

        Decoding passes `cache`, {"k", "v": (B, S, K, H), "start": int}: this call's keys and
        values are written at slots start..start+T-1, the queries attend to all S slots
        (mask: (B, T, S)), and the result is (y, updated cache).
        """
        q = self._project(x, self.q_proj, self.q_bias, "heads")  # (B, T, N, H)
        k = self._project(x, self.k_proj, self.k_bias, "kv_heads")  # (B, T, K, H)
        v = self._project(x, self.v_proj, self.v_bias, "kv_heads")  # (B, T, K, H)
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if cache is None:
            out = causal_attention(q, k, v, mask)  # (B, T, N, H)
        else:
            k, v = (constrain(jax.lax.dynamic_update_slice_in_dim(
                        cache[name], new.astype(cache[name].dtype), cache["start"], axis=1),
                        ("batch", "seq", "kv_heads", "head_dim"))
                    for name, new in (("k", k), ("v", v)))
            cache = {"k": k, "v": v, "start": cache["start"]}
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                               mask=mask[:, None])
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = matmul(out, self.o_proj[...], contract=2)  # (B, T, N, H) x (N, H, D)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(self.dtype)
        return y if cache is None else (y, cache)
