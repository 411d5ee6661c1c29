"""Causal self-attention: multi-head, grouped-query or multi-query; full, sliding or banded.

One code path for every variant:

- the number of kv heads K divides the number of query heads N (K == N: MHA, 1 < K < N: GQA
  as in Llama 3 / Mistral, K == 1: MQA); each kv head serves N / K query heads;
- which keys a query may see is one boolean mask: causal, same packed document (segment
  ids), and, for windowed layers, at most `window - 1` tokens back (Mistral's sliding window;
  GPT-3's locally banded layers use the same band on alternate layers);
- the softmax(QK^T)V itself is one of three kernels (`model.attention`):
  - `xla`: `jax.nn.dot_product_attention`'s XLA implementation with the (B, T, T) mask; it
    materialises the scores. On CPU, causal blocks of 128 queries skip most of the masked
    triangle, computed as einsums in a heads-major layout (measured in docs/benchmarks.md).
  - `splash`: the Pallas TPU splash attention kernel (flash attention that skips masked
    blocks), with segment ids and the causal or sliding-window mask; no T x T array ever
    exists. Run per device under `shard_map` (batch over the data axes, heads over
    `tensor`), one kernel call per kv head with its query heads. On CPU it runs in Pallas's
    interpret mode, slowly, which is how the tests check it against `xla`.
  - `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention(implementation=
    "cudnn")`, bf16/fp16 only, causal and window given to cuDNN, documents as a mask.
    Not run here (no GPU): opt-in only.
  `auto` (the default) is `splash` on TPU (sequence a multiple of 128) and `xla` elsewhere.
- context parallelism (the `seq` axis split over devices): each device keeps its queries and
  gathers the keys and values of the whole sequence; the sequence arrives in a
  load-balanced order (`Mask.order`), so causality is decided by token index, not by place.
  A model with both full and banded layers (GPT-3) scans a traced per-layer window; the
  kernels need it static, so they switch between one kernel per distinct window.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxgpt import quantize
from maxgpt.config import ModelConfig
from maxgpt.model.layers import matmul, normal, rope, zeros
from maxgpt.sharding import axis_size, constrain, logical_to_spec, param, platform


class Mask(NamedTuple):
    """What a query may see while training: causal, within its packed document (segment
    ids, (B, T)), and fewer than `window` tokens back (this layer's window; 0: no limit).
    `order`: each token's index in the sequence when the sequence is laid out in another
    order (context parallelism's load balancing, sharding.balanced_order); None: 0..T-1."""

    segment_ids: jax.Array
    window: jax.Array | int = 0
    order: np.ndarray | None = None

    def dense(self) -> jax.Array:
        """The (B, T, T) boolean mask."""
        return window_mask(attention_mask(self.segment_ids, self.order), self.window,
                           self.order)


def _index(seq_len: int, order: np.ndarray | None) -> jax.Array:
    return jnp.arange(seq_len) if order is None else jnp.asarray(order)


def attention_mask(segment_ids: jax.Array, order: np.ndarray | None = None) -> jax.Array:
    """(B, T) segment ids -> (B, T, T) mask: causal and within one packed document."""
    index = _index(segment_ids.shape[1], order)
    causal = index[:, None] >= index[None, :]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_doc


def window_mask(mask: jax.Array, window: jax.Array | int,
                order: np.ndarray | None = None) -> jax.Array:
    """Restrict a (B, T, T) causal mask to keys fewer than `window` tokens back (0: no limit)."""
    index = _index(mask.shape[-1], order)
    distance = index[:, None] - index[None, :]  # query index - key index
    return mask & ((window <= 0) | (distance < window))[None]


# XLA computes every query-key product, the masked upper triangle included. On CPU, giving
# each block of 128 queries only the keys up to its own end skips most of that triangle
# (measured at the benchmark shape in docs/benchmarks.md). Elsewhere it is unmeasured, and the
# flash kernels meant for GPU and TPU skip masked tiles themselves: one block there.
CPU_QUERY_BLOCK = 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     blocked: bool = True) -> jax.Array:
    """softmax(QK^T / sqrt(H)) V over visible keys. q: (B, T, N, H); k, v: (B, T, K, H).
    `blocked`: the sequence is in natural order (so on CPU blocks of queries may skip the
    keys after their own)."""
    T = q.shape[1]
    if blocked and platform() == "cpu" and T % CPU_QUERY_BLOCK == 0 and T > CPU_QUERY_BLOCK:
        return _blocked_attention(q, k, v, mask, CPU_QUERY_BLOCK)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def _blocked_attention(q, k, v, mask, block: int) -> jax.Array:
    """causal_attention on CPU: heads-major layout, each block of queries against the keys
    up to its own end; scores and softmax in fp32."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qt = (q * H**-0.5).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # (B,K,G,T,H)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, H)
    outs = []
    for start in range(0, T, block):
        end = start + block
        scores = jnp.einsum("bkgqh,bksh->bkgqs", qt[:, :, :, start:end], kt[:, :, :end],
                            preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, start:end, :end], scores,
                           jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgqs,bksh->bkgqh", probs, vt[:, :, :end]))
    out = jnp.concatenate(outs, axis=3)  # (B, K, G, T, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


SPLASH_BLOCK = 512  # query and key block of the splash kernel (or the largest that divides T)


def _aligned(seq_len: int, shards: int) -> int:
    """The run of consecutive tokens that a kernel block must fit in: the whole sequence, or
    under context parallelism one chunk of the load-balanced order (sharding.balanced_order)."""
    return seq_len // (2 * shards) if shards > 1 else seq_len


def _splash_kernel(seq_len: int, group: int, window: int, block: int,
                   order: np.ndarray | None, shards: int, interpret: bool):
    """The splash kernel for `group` query heads sharing one kv head (MQA form), causal
    and, for window W > 0, fewer than W tokens back. Built in every trace that uses it:
    its block-mask tables become constants of that trace (a kernel kept across traces would
    carry one trace's values into the next); jax caches the host-side mask processing.

    Under context parallelism (`shards` > 1) the queries arrive in the load-balanced
    `order` and the keys in natural order: the mask's query indices (`q_sequence`, which
    the kernel reads to compute causality) are that order, and the kernel's block tables
    are split over the shards with the queries (`manual_sharding_spec`)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    mask = sa.CausalMask(shape) if window <= 0 else sa.LocalMask(shape, (window - 1, 0), 0)
    if order is not None:
        mask.q_sequence = np.asarray(order, np.int32)
    b = math.gcd(block, _aligned(seq_len, shards))  # a multiple of 128 (model.attention)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mqa(sa.MultiHeadMask([mask] * group), block_sizes=blocks,
                              head_shards=1, q_seq_shards=shards, interpret=interpret)


def _window_index(mask: Mask, windows: tuple[int, ...]) -> jax.Array:
    """Where this layer's window, which may be traced (a scanned layer stack with several
    distinct windows), stands among the static `windows`."""
    return jnp.searchsorted(jnp.asarray(windows), mask.window)


def _per_window(index: jax.Array, windows: tuple[int, ...], fn):
    """fn(window) for the window at `index` (_window_index): a switch over one branch per
    static window."""
    if len(windows) == 1:
        return fn(windows[0])
    return jax.lax.switch(index, [functools.partial(fn, w) for w in windows])


WHOLE_KEYS = ("batch", None, "kv_heads", "head_dim")  # keys, values: whole sequence


def _whole_keys(k, v, mask: Mask):
    """Keys, values and their segment ids whole along the sequence on every device of the
    context axis (one all-gather each) and in natural order, for context parallelism."""
    segments = mask.segment_ids
    if mask.order is not None:
        inverse = np.argsort(mask.order)
        k, v, segments = (jnp.take(a, inverse, axis=1) for a in (k, v, segments))
    return constrain(k, WHOLE_KEYS), constrain(v, WHOLE_KEYS), constrain(segments,
                                                                         ("batch", None))


def splash_attention(q, k, v, mask: Mask, windows: tuple[int, ...]) -> jax.Array:
    """softmax(QK^T / sqrt(H)) V with the splash kernel. q: (B, T, N, H); k, v: (B, T, K, H).
    Run per device under `shard_map`: rows over the data axes, heads over `tensor`, and under
    context parallelism queries over `context` against whole keys and values."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    T, N, K, H = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    shards = axis_size("seq")
    kernels = {w: _splash_kernel(T, N // K, w, SPLASH_BLOCK, mask.order, shards,
                                 interpret=platform() == "cpu") for w in windows}
    q_segments = kv_segments = mask.segment_ids
    if shards > 1:
        k, v, kv_segments = _whole_keys(k, v, mask)

    def local(kernels, which, q, k, v, q_segments, kv_segments):  # a device's rows, heads
        b, t, n, kh = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        qg = (q * H**-0.5).transpose(0, 2, 1, 3).reshape(b, kh, n // kh, t, H)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kh, T, H)

        def run(window):
            per_head = jax.vmap(kernels[window], in_axes=(0, 0, 0, None))  # kv heads
            return jax.vmap(per_head)(qg, kt, vt, SegmentIds(q_segments, kv_segments))

        out = _per_window(which, windows, run)  # (b, kh, n/kh, t, H)
        return out.reshape(b, n, t, H).transpose(0, 2, 1, 3)

    which = _window_index(mask, windows)  # an argument: the body sees no outer values
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(kernels, which, q, k, v, q_segments, kv_segments)
    q_spec = logical_to_spec(("batch", "seq", "heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # kv heads not split like the query heads: keep them whole
        q_spec = P(q_spec[0], q_spec[1], None, None)
        kv_spec = P(kv_spec[0], None, None, None)
    # (heads, query blocks); on a mesh of plain axes: inside a pipeline stage's shard_map
    # the stage axis is manual, which the kernel's own shape check cannot handle
    by_query = NamedSharding(AbstractMesh(mesh.axis_sizes, mesh.axis_names),
                             P(None, q_spec[1]))
    kernel_specs = {w: kernel.manual_sharding_spec(by_query) for w, kernel in kernels.items()}
    return jax.shard_map(
        local, in_specs=(kernel_specs, P(), q_spec, kv_spec, kv_spec, P(q_spec[0], q_spec[1]),
                         P(kv_spec[0], None)),
        out_specs=q_spec, check_vma=False)(kernels, which, q, k, v, q_segments, kv_segments)


def cudnn_attention(q, k, v, mask: Mask, windows: tuple[int, ...],
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention (GPU, bf16/fp16): causal and window handled by cuDNN, packed
    documents as a (B, 1, T, T) mask. (`implementation="xla"` runs the same call anywhere:
    how the tests check this wiring without a GPU.) A sequence in load-balanced order
    (context parallelism) is not causal by index: then the whole mask is given."""
    if mask.order is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None],
                                            implementation=implementation)
    same_doc = mask.segment_ids[:, :, None] == mask.segment_ids[:, None, :]

    def run(window):
        return jax.nn.dot_product_attention(
            q, k, v, mask=same_doc[:, None], is_causal=True, implementation=implementation,
            local_window_size=None if window <= 0 else (window - 1, 0))

    return _per_window(_window_index(mask, windows), windows, run)


def attention_kernel(requested: str, seq_len: int) -> str:
    """The kernel `model.attention` means for this platform and sequence length."""
    if requested != "auto":
        return requested
    tiles = _aligned(seq_len, axis_size("seq")) % 128 == 0
    return "splash" if platform() == "tpu" and tiles else "xla"


def _write_cache(cache: dict, k: jax.Array, v: jax.Array) -> dict:
    """The cache with this call's keys and values (B, T, K, H) written at slots start..; an
    int8 cache (one with scales) stores them rounded to int8 with a scale per token and head
    (absmax over the head's dims)."""
    out = {"start": cache["start"]}
    for name, new in (("k", k), ("v", v)):
        entries = {name: new.astype(cache[name].dtype)}
        if f"{name}_scale" in cache:
            values, scale = quantize.int8_vectors(new)
            entries = {name: values, f"{name}_scale": scale}
        for key, value in entries.items():
            names = ("batch", "seq", "kv_heads", "head_dim" if key == name else None)
            out[key] = constrain(jax.lax.dynamic_update_slice_in_dim(
                cache[key], value, cache["start"], axis=1), names)
    return out


def _read_cache(cache: dict, name: str, dtype) -> jax.Array:
    if f"{name}_scale" not in cache:
        return cache[name].astype(dtype)
    return (cache[name].astype(jnp.float32) * cache[f"{name}_scale"]).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype, self.quant = jnp.dtype(cfg.dtype), cfg.quantize
        self.kernel = cfg.attention
        self.windows = tuple(sorted(set(cfg.layer_windows())))
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
        y = matmul(x, kernel[...], quant=self.quant)  # (B, T, D) x (D, heads, H)
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return constrain(y, ("batch", "seq", heads_axis, "head_dim"))

    def __call__(self, x: jax.Array, mask, positions: jax.Array, cache=None):
        """x: (B, T, D); mask: a `Mask` (training, evaluation).

        Decoding passes `cache`, {"k", "v": (B, S, K, H), "start": int}, and the mask as a
        (B, T, S) bool array: this call's keys and values are written at slots
        start..start+T-1, the queries attend to the S slots the mask allows, and the result
        is (y, updated cache).
        """
        q = self._project(x, self.q_proj, self.q_bias, "heads")  # (B, T, N, H)
        k = self._project(x, self.k_proj, self.k_bias, "kv_heads")  # (B, T, K, H)
        v = self._project(x, self.v_proj, self.v_bias, "kv_heads")  # (B, T, K, H)
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if cache is None:
            kernel = attention_kernel(self.kernel, x.shape[1])
            if kernel == "splash":
                out = splash_attention(q, k, v, mask, self.windows)  # (B, T, N, H)
            elif kernel == "cudnn":
                out = cudnn_attention(q, k, v, mask, self.windows)
            else:
                if axis_size("seq") > 1:  # context parallelism: local queries, all keys
                    k, v = constrain(k, WHOLE_KEYS), constrain(v, WHOLE_KEYS)
                out = causal_attention(q, k, v, mask.dense(), blocked=mask.order is None)
        else:
            cache = _write_cache(cache, k, v)
            k, v = (_read_cache(cache, name, q.dtype) for name in ("k", "v"))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = matmul(out, self.o_proj[...], 2, self.quant)  # (B, T, N, H) x (N, H, D)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(self.dtype)
        return y if cache is None else (y, cache)
