"""Mixture-of-experts feed-forward layer: a router, k of E experts per token, expert parallelism.

It takes the MLP's place in the layers `ModelConfig.moe_layers()` names. For a token x:

- router logits in fp32, z = x W_r (E values; the router weights are kept in fp32 too);
- routing: `topk_softmax` (Mixtral, Jiang et al. 2024) takes the k largest logits and a
  softmax over those k as weights; `softmax_topk` (Switch, Fedus et al. 2021; GShard, Lepikhin
  et al. 2020) takes a softmax over all E and the k largest probabilities, not renormalised;
- y = sum_j w_j expert_{e_j}(x) (+ the shared experts' MLP of x, DeepSeekMoE style); every
  expert is an MLP of the model's kind (SwiGLU or GELU) and width mlp_dim, without biases.

Dispatch, `model.moe_dispatch`:

- `dropless`: every assignment is computed. Assignments are sorted by expert and each
  expert's rows are multiplied at once by a grouped matmul (`grouped_matmul`).
- `capacity`: each expert takes at most C = ceil(capacity_factor * T * k / E) assignments of
  each sequence (row), first choices before second choices and earlier tokens before later
  ones; the rest are dropped (the token keeps its residual and shared experts) and counted.
  Capacity is per row, so what is dropped depends neither on the mesh nor on microbatching
  (except under context parallelism, where each device dispatches its part of every row
  and the capacity applies to that part).

Padding tokens (segment 0) are routed to no expert and left out of every statistic.

Expert parallelism (mesh axis `expert`): the expert weights are split over it. Inside
`shard_map` each device packs its own tokens into one buffer per destination device, an
`all_to_all` exchanges the buffers, every device runs only its own experts, and a second
`all_to_all` brings the results home. In capacity mode the buffer is GShard's (rows, E, C, D).
Dropless, one device may send all its k*N assignments to a single peer, so each of the ep
buffers is sized k*N rows: a fixed-shape stand-in for a ragged all-to-all that costs ep*k*N*D
memory per device. Tensor parallelism splits every expert's hidden units (one psum after the
down projection); FSDP all-gathers the expert weights on entry to `shard_map` (and
reduce-scatters their gradients on the way back).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxgpt import quantize
from maxgpt.config import ModelConfig
from maxgpt.model.layers import MLP, matmul, normal
from maxgpt.sharding import axis_size, logical_to_spec, param, platform

# logical axes of the expert weights (E, D, F) and (E, F, D)
UP_AXES = ("experts", "embed", "mlp")
DOWN_AXES = ("experts", "mlp", "embed")


def route(logits: jax.Array, k: int, routing: str) -> tuple[jax.Array, jax.Array]:
    """Router logits (..., E) fp32 -> (experts (..., k) int, weights (..., k) fp32)."""
    if routing == "topk_softmax":
        top, experts = jax.lax.top_k(logits, k)
        return experts, jax.nn.softmax(top, axis=-1)
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    return experts, weights


def routing_stats(logits: jax.Array, experts: jax.Array, valid: jax.Array) -> dict:
    """One layer's routing over its valid tokens. logits (N, E), experts (N, k), valid (N,).

    - balance_loss: Switch's E * sum_e f_e P_e, f_e the fraction of the N*k assignments that
      went to expert e and P_e the mean router probability of e; 1.0 when perfectly even;
      its gradient flows through P only, as in Switch;
    - z_loss: ST-MoE's (Zoph et al. 2022) mean over tokens of logsumexp(logits)^2;
    - load_max_mean: the busiest expert's assignments over the mean per expert.
    """
    E, k = logits.shape[-1], experts.shape[-1]
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    counts = (jax.nn.one_hot(experts, E) * w[:, None, None]).sum((0, 1))  # (E,)
    mean_prob = (jax.nn.softmax(logits, axis=-1) * w[:, None]).sum(0) / n
    return {"balance_loss": E * jnp.sum(counts / (n * k) * mean_prob),
            "z_loss": jnp.sum(w * jnp.square(jax.nn.logsumexp(logits, axis=-1))) / n,
            "load_max_mean": counts.max() / jnp.maximum(counts.mean(), 1e-9)}


def capacity(cfg: ModelConfig, seq_len: int) -> int:
    """Assignments each expert takes from one row of seq_len tokens in capacity mode."""
    return max(1, math.ceil(cfg.capacity_factor * seq_len * cfg.experts_per_token
                            / cfg.num_experts))


def _activate(h: jax.Array, gate: jax.Array | None) -> jax.Array:
    return jax.nn.gelu(h, approximate=True) if gate is None else jax.nn.silu(gate) * h


def _capacity_dispatch(x, experts, weights, valid, w, *, num_experts, capacity, ep_axis,
                       tp_axis, quant):
    """Rows of tokens x (B, T, D) through their experts with per-row capacity.
    Returns (y (B, T, D) fp32, dropped assignments per row (B, 1))."""
    B, T, D = x.shape
    k, E, C = experts.shape[-1], num_experts, capacity
    rows = jnp.arange(B)[:, None]
    # Assignments in priority order, first choices of the whole row before second choices.
    a = jnp.where(valid[..., None], experts, E).swapaxes(1, 2).reshape(B, k * T)
    onehot = jax.nn.one_hot(a, E, dtype=jnp.int32)  # the not-routed sentinel E: all zero
    pos = (jnp.cumsum(onehot, axis=1) * onehot).sum(-1) - 1  # place in its expert's queue
    keep = (pos >= 0) & (pos < C)
    e_idx, p_idx = jnp.where(keep, a, E), jnp.where(keep, pos, 0)  # E: dropped by the scatter
    token = jnp.tile(jnp.arange(T), k)
    buf = jnp.zeros((B, E, C, D), x.dtype).at[rows, e_idx, p_idx].set(x[:, token], mode="drop")
    if ep_axis:  # (B, E, C, D) -> (ep * B, E / ep, C, D): every source's rows, local experts
        buf = jax.lax.all_to_all(buf, ep_axis, split_axis=1, concat_axis=0, tiled=True)
    def experts_dot(h, weight, axis=None):  # (B, E, C, d) x (E, d, f) -> (B, E, C, f)
        weight = quantize.weight(weight, x.dtype)
        if quant == "none":
            return jnp.einsum("becd,edf->becf", h, weight)
        b, e, c, d = h.shape
        out = quantize.batched_dot(h.swapaxes(0, 1).reshape(e, b * c, d), weight, quant, axis)
        return out.reshape(e, b, c, -1).swapaxes(0, 1)

    h = experts_dot(buf, w["up"])
    gate = None if w["gate"] is None else experts_dot(buf, w["gate"])
    out = experts_dot(_activate(h, gate), w["down"], tp_axis)  # the hidden units split over tp
    if tp_axis:
        out = jax.lax.psum(out, tp_axis)
    if ep_axis:
        out = jax.lax.all_to_all(out, ep_axis, split_axis=0, concat_axis=1, tiled=True)
    got = out[rows, jnp.minimum(e_idx, E - 1), p_idx]  # (B, k*T, D)
    scale = weights.swapaxes(1, 2).reshape(B, k * T) * keep
    y = (got.astype(jnp.float32) * scale[..., None]).reshape(B, k, T, D).sum(1)
    return y, ((pos >= 0) & ~keep).sum(-1, keepdims=True)


# XLA:CPU runs `jax.lax.ragged_dot` as E dense matmuls over all rows (measured 8x a dense
# matmul of the same rows at E=8, docs/benchmarks.md). There, rows go in tiles of this many,
# each tile belonging to one expert, for ~1.1-1.6x instead. Elsewhere ragged_dot is left to
# the backend (TPU lowers it to a grouped matmul; GPU is unmeasured).
CPU_EXPERT_TILE = 256


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, tiled: bool | None = None,
                   quant: str = "none", split_axis: str | None = None) -> jax.Array:
    """Rows x (M, D) sorted by group, `sizes[e]` rows for group e (rows past their sum are
    unused and give 0), times that group's w[e] (E, D, F) -> (M, F); `quant` int8 | fp8:
    both operands quantized (maxgpt/quantize.py), with scales over all of D where D is split
    over mesh axis `split_axis` (tiled only: ragged_dot_qt takes no such hook).

    tiled (default: on CPU): each group's rows start a fresh tile of CPU_EXPERT_TILE rows and
    every tile is one batched matmul with its group's weights; at most E tiles are extra.
    """
    if not (platform() == "cpu" if tiled is None else tiled):
        if quant != "none":
            return quantize.ragged_dot(x, w, sizes, quant)
        return jax.lax.ragged_dot(x, w, sizes)
    M, D = x.shape
    E = w.shape[0]
    tile = min(CPU_EXPERT_TILE, -(-M // 8) * 8)
    n_tiles = -(-M // tile) + E
    tiles = (sizes + tile - 1) // tile  # per group
    first_tile = jnp.cumsum(tiles) - tiles
    ends = jnp.cumsum(sizes)
    row = jnp.arange(M)
    group = jnp.searchsorted(ends, row, side="right")  # E for unused rows
    g = jnp.minimum(group, E - 1)
    slot = jnp.where(group < E, first_tile[g] * tile + row - (ends - sizes)[g], n_tiles * tile)
    buf = jnp.zeros((n_tiles * tile, D), x.dtype).at[slot].set(x, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(n_tiles),
                                              side="right"), E - 1)
    tiles_in = buf.reshape(n_tiles, tile, D)
    out = (jnp.einsum("tnd,tdf->tnf", tiles_in, w[tile_group]) if quant == "none" else
           quantize.batched_dot(tiles_in, w[tile_group], quant, split_axis))
    out = out.reshape(n_tiles * tile, -1)
    return jnp.where((group < E)[:, None], out[jnp.minimum(slot, n_tiles * tile - 1)], 0)


def _dropless_dispatch(x, experts, weights, valid, w, *, num_experts, ep, ep_axis, tp_axis,
                       quant):
    """Tokens x (B, T, D) through all their experts: sorted by expert, grouped matmuls.
    Returns (y (B, T, D) fp32, zeros (B, 1): nothing is dropped)."""
    B, T, D = x.shape
    k, E = experts.shape[-1], num_experts
    local = E // ep
    N = B * T * k
    a = jnp.where(valid[..., None], experts, E).reshape(N)  # token-major assignments
    dest = a // local  # the device holding the expert; ep for padding (not sent)
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
    pos = (jnp.cumsum(onehot, axis=0) * onehot).sum(-1) - 1  # row in that device's buffer
    send = jnp.zeros((ep, N, D), x.dtype).at[dest, pos].set(
        x.reshape(B * T, D)[jnp.arange(N) // k], mode="drop")
    ids = jnp.full((ep, N), local, jnp.int32).at[dest, pos].set(a % local, mode="drop")
    if ep_axis:  # buffer i goes to device i; what arrives is one buffer from every device
        send = jax.lax.all_to_all(send, ep_axis, 0, 0, tiled=True)
        ids = jax.lax.all_to_all(ids, ep_axis, 0, 0, tiled=True)
    rows, ids = send.reshape(ep * N, D), ids.reshape(ep * N)
    order = jnp.argsort(ids, stable=True)  # unused rows (id == local) sort last
    sizes = jnp.bincount(ids, length=local + 1)[:local].astype(jnp.int32)
    sorted_rows = rows[order]

    def grouped(h, weight, split_axis=None):
        return grouped_matmul(h, quantize.weight(weight, x.dtype), sizes, quant=quant,
                              split_axis=split_axis)

    gate = None if w["gate"] is None else grouped(sorted_rows, w["gate"])
    out_sorted = grouped(_activate(grouped(sorted_rows, w["up"]), gate), w["down"], tp_axis)
    if tp_axis:
        out_sorted = jax.lax.psum(out_sorted, tp_axis)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(ep, N, D)
    if ep_axis:
        out = jax.lax.all_to_all(out, ep_axis, 0, 0, tiled=True)
    sent = dest < ep
    got = out[jnp.minimum(dest, ep - 1), jnp.where(sent, pos, 0)]  # (N, D)
    scale = weights.reshape(N) * sent
    y = (got.astype(jnp.float32) * scale[:, None]).reshape(B, T, k, D).sum(2)
    return y, jnp.zeros((B, 1), jnp.int32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, D, F, pdt = cfg.num_experts, cfg.embed_dim, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        self.router = param(rngs, init, (D, E), ("embed", None), jnp.float32)
        self.up_proj = param(rngs, init, (E, D, F), UP_AXES, pdt)
        self.gate_proj = (param(rngs, init, (E, D, F), UP_AXES, pdt) if cfg.mlp == "swiglu"
                          else None)
        self.down_proj = param(rngs, out_init, (E, F, D), DOWN_AXES, pdt)
        self.shared = (MLP(cfg, rngs, width=cfg.num_shared_experts * F)
                       if cfg.num_shared_experts else None)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
        """x: (B, T, D); valid: (B, T) bool, False for padding. Returns (y, routing stats:
        the `routing_stats` keys and `dropped`, the fraction of assignments dropped)."""
        cfg = self.cfg
        B, T, _ = x.shape
        logits = matmul(x.astype(jnp.float32), self.router[...])  # (B, T, E) fp32
        experts, weights = route(logits, cfg.experts_per_token, cfg.moe_routing)
        stats = routing_stats(logits.reshape(B * T, -1),
                              experts.reshape(B * T, -1), valid.reshape(-1))
        y, dropped = self._dispatch(x, experts, weights, valid)
        stats["dropped"] = dropped.sum() / jnp.maximum(cfg.experts_per_token * valid.sum(), 1)
        y = y.astype(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats

    def _dispatch(self, x, experts, weights, valid):
        cfg = self.cfg
        w = {"up": self.up_proj[...], "down": self.down_proj[...],
             "gate": None if self.gate_proj is None else self.gate_proj[...]}
        mesh = jax.sharding.get_abstract_mesh()
        up_spec = (P() if mesh.empty else
                   logical_to_spec(("experts", None, "mlp"), w["up"].shape, mesh))
        ep_axis, tp_axis = up_spec[0] if up_spec else None, up_spec[2] if up_spec else None
        ep = 1 if ep_axis is None else mesh.shape[ep_axis]
        # each device dispatches the tokens it holds: under context parallelism a part
        # of every row, and capacity applies to that part
        local_len = x.shape[1] // (1 if mesh.empty else axis_size("seq"))
        if cfg.moe_dispatch == "capacity":
            fn = functools.partial(_capacity_dispatch, num_experts=cfg.num_experts,
                                   capacity=capacity(cfg, local_len), ep_axis=ep_axis,
                                   tp_axis=tp_axis, quant=cfg.quantize)
        else:
            fn = functools.partial(_dropless_dispatch, num_experts=cfg.num_experts, ep=ep,
                                   ep_axis=ep_axis, tp_axis=tp_axis, quant=cfg.quantize)
        if mesh.empty:
            return fn(x, experts, weights, valid, w)
        # Each device works on the tokens it holds (rows replicated over some axis are simply
        # computed on each of its devices); weights arrive split over experts and hidden units.
        tokens = P(*logical_to_spec(("batch", "seq"), x.shape[:2], mesh))
        down_spec = P(up_spec[0], up_spec[2], None)
        w_specs = {"up": up_spec, "down": down_spec,
                   "gate": None if w["gate"] is None else up_spec}
        return jax.shard_map(fn, in_specs=(tokens, tokens, tokens, tokens, w_specs),
                             out_specs=(tokens, tokens),
                             check_vma=False)(x, experts, weights, valid, w)
