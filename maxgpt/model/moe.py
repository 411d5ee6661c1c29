"""Mixture-of-experts feed-forward layer: a router, k of E experts per token, expert parallelism.

It takes the MLP's place in the layers `ModelConfig.moe_layers()` names. For a token x:

- router logits in fp32, z = x W_r (E values; the router weights are kept in fp32 too);
- routing: `topk_softmax` (Mixtral, Jiang et al. 2024) takes the k largest logits and a
  softmax over those k as weights; `softmax_topk` (Switch, Fedus et al. 2021; GShard, Lepikhin
  et al. 2020) takes a softmax over all E and the k largest probabilities, not renormalised;
- y = sum_j w_j expert_{e_j}(x) (+ the shared experts' MLP of x, DeepSeekMoE style); every
  expert is an MLP of the model's kind (SwiGLU or GELU) and width mlp_dim, without biases.

Dispatch, `model.moe_dispatch`:

- `dropless`: every assignment is computed. Assignments are grouped by expert
  (`expert_groups`) and each expert's rows multiplied by its weights (`grouped_dot`: TPU and
  GPU `ragged_dot`, CPU one tile of rows at a time).
- `capacity`: each expert takes at most C = ceil(capacity_factor * T * k / E) assignments of
  each sequence (row), first choices before second choices and earlier tokens before later
  ones; the rest are dropped (the token keeps its residual and shared experts) and counted.
  Each expert multiplies its (rows x C) buffer at once.
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
from typing import NamedTuple

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


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def move_rows(x: jax.Array, to: jax.Array, back: jax.Array) -> jax.Array:
    """Rows of x (M, ...) rearranged by a one-to-one map: out[s] = x[to[s]] (zero where
    to[s] >= M); `back` is the map the other way, back[i] the row of out that x[i] went to
    (>= len(to): none). Forward and backward are both gathers: a gather's own gradient is a
    scatter-add, which XLA:CPU runs row after row."""
    return _take_rows(x, to)


def _move_fwd(x, to, back):
    return _take_rows(x, to), (to, back)


def _move_bwd(residuals, g):
    to, back = residuals
    return _take_rows(g, back), None, None


move_rows.defvjp(_move_fwd, _move_bwd)


def inverse(slot: jax.Array, size: int) -> jax.Array:
    """A one-to-one map of rows to `size` slots (slot >= size: nowhere), turned around: for
    each slot the row that lands there, len(slot) where none does."""
    rows = slot.shape[0]
    return jnp.full((size,), rows, jnp.int32).at[slot].set(jnp.arange(rows, dtype=jnp.int32),
                                                            mode="drop")


def _ranks(ids: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """For rows with group ids (>= groups: none), each row's place among the earlier rows of
    its group, and the rows per group."""
    onehot = jax.nn.one_hot(ids, groups, dtype=jnp.int32)  # a row in no group: all zero
    return (jnp.cumsum(onehot, axis=0) * onehot).sum(-1) - 1, onehot.sum(0)


def _capacity_dispatch(x, experts, weights, valid, w, *, num_experts, capacity, ep_axis,
                       tp_axis, quant):
    """Rows of tokens x (B, T, D) through their experts with per-row capacity.
    Returns (y (B, T, D) fp32, dropped assignments per row (B, 1))."""
    B, T, D = x.shape
    k, E, C = experts.shape[-1], num_experts, capacity
    # Assignments in priority order, first choices of the whole row before second choices.
    a = jnp.where(valid[..., None], experts, E).swapaxes(1, 2).reshape(B, k * T)
    pos = jax.vmap(lambda ids: _ranks(ids, E)[0])(a)  # place in its expert's queue
    keep = (pos >= 0) & (pos < C)
    # the buffer expert-major, (E, B, C, D): each expert's rows together
    slot = jnp.where(keep, (a * B + jnp.arange(B)[:, None]) * C + pos, E * B * C).reshape(-1)
    back = inverse(slot, E * B * C)
    rows = jnp.broadcast_to(x[:, None], (B, k, T, D)).reshape(B * k * T, D)
    buf = move_rows(rows, back, slot).reshape(E, B, C, D)
    if ep_axis:  # (E, B, C, D) -> (E / ep, ep * B, C, D): its experts' rows from every device
        buf = jax.lax.all_to_all(buf, ep_axis, split_axis=0, concat_axis=1, tiled=True)

    def experts_dot(h, weight, axis=None):  # (E, B, C, d) x (E, d, f) -> (E, B, C, f)
        e, b, c, d = h.shape
        weight = quantize.weight(weight, x.dtype)
        h = h.reshape(e, b * c, d)
        if quant != "none":
            out = quantize.batched_dot(h, weight, quant, axis)
        elif platform() == "cpu":  # a matmul per expert beats XLA:CPU's batched one
            out = jnp.stack([h[i] @ weight[i] for i in range(e)])
        else:
            out = jnp.einsum("end,edf->enf", h, weight)
        return out.reshape(e, b, c, -1)

    h = experts_dot(buf, w["up"])
    gate = None if w["gate"] is None else experts_dot(buf, w["gate"])
    out = experts_dot(_activate(h, gate), w["down"], tp_axis)  # the hidden units split over tp
    if tp_axis:
        out = jax.lax.psum(out, tp_axis)
    if ep_axis:
        out = jax.lax.all_to_all(out, ep_axis, split_axis=1, concat_axis=0, tiled=True)
    got = move_rows(out.reshape(E * B * C, D), slot, back)  # (B * k * T, D)
    scale = weights.swapaxes(1, 2).reshape(B * k * T) * keep.reshape(-1)
    y = (got.astype(jnp.float32) * scale[:, None]).reshape(B, k, T, D).sum(1)
    return y, ((pos >= 0) & ~keep).sum(-1, keepdims=True)


# XLA:CPU runs `jax.lax.ragged_dot` as E dense matmuls over all rows (measured 8x a dense
# matmul of the same rows at E=8, docs/benchmarks.md). There, rows go in tiles of this many,
# each tile belonging to one expert, multiplied one tile at a time (`_tiles_dot`). Elsewhere
# ragged_dot is left to the backend (TPU lowers it to a grouped matmul; GPU is unmeasured).
CPU_EXPERT_TILE = 256


@jax.custom_vjp
def _tiles_dot(tiles: jax.Array, w: jax.Array, tile_group: jax.Array,
               used: jax.Array) -> jax.Array:
    """Tiles (n, tile, D) of rows, tile i all of group tile_group[i], times that group's
    w (G, D, F); only the first `used` tiles, the rest left zero. One matmul per tile in a
    loop of `used` turns: the weights are read where they lie (a batched matmul would copy
    every tile's weights first, and compute the unused tiles too: measured 1.7x a dense
    matmul of the same rows, against ~1.1x)."""
    def body(i, out):
        return jax.lax.dynamic_update_index_in_dim(out, tiles[i] @ w[tile_group[i]], i, 0)
    return jax.lax.fori_loop(0, used, body, jnp.zeros(tiles.shape[:2] + w.shape[-1:],
                                                      jnp.result_type(tiles, w)))


def _tiles_dot_fwd(tiles, w, tile_group, used):
    return _tiles_dot(tiles, w, tile_group, used), (tiles, w, tile_group, used)


def _tiles_dot_bwd(residuals, g):
    tiles, w, tile_group, used = residuals

    def body(i, grads):
        d_tiles, d_w = grads
        e = tile_group[i]
        d_tiles = jax.lax.dynamic_update_index_in_dim(
            d_tiles, (g[i] @ w[e].T).astype(tiles.dtype), i, 0)
        d_w = jax.lax.dynamic_update_index_in_dim(
            d_w, d_w[e] + jnp.matmul(tiles[i].T, g[i], preferred_element_type=jnp.float32),
            e, 0)
        return d_tiles, d_w

    d_tiles, d_w = jax.lax.fori_loop(0, used, body, (jnp.zeros_like(tiles),
                                                     jnp.zeros(w.shape, jnp.float32)))
    return d_tiles, d_w.astype(w.dtype), None, None


_tiles_dot.defvjp(_tiles_dot_fwd, _tiles_dot_bwd)


class Groups(NamedTuple):
    """Where rows go when grouped by expert (`expert_groups`)."""
    slot: jax.Array  # (M,) each row's place in the grouped buffer (its length: none)
    back: jax.Array  # the buffer's rows' sources (`inverse` of slot)
    sizes: jax.Array  # (G,) rows per group
    tile_group: jax.Array | None  # tiled: (tiles,) the group of each tile of `tile` rows
    used: jax.Array | None  # tiled: the tiles that hold rows (the others come after them)
    tile: int


def expert_groups(ids: jax.Array, groups: int, tiled: bool | None = None) -> Groups:
    """The layout of rows with group ids `ids` (M,) (>= groups: in none) for `grouped_dot`:
    each group's rows together, in row order. Tiled (default: on CPU), every group starts a
    fresh tile of CPU_EXPERT_TILE rows (at most G tiles more than the rows need); otherwise
    packed, for `ragged_dot`."""
    M = ids.shape[0]
    tiled = platform() == "cpu" if tiled is None else tiled
    rank, sizes = _ranks(ids, groups)
    tile = min(CPU_EXPERT_TILE, -(-M // 8) * 8) if tiled else 1
    padded = -(-sizes // tile) * tile
    length = (-(-M // tile) + groups) * tile if tiled else M
    start = jnp.cumsum(padded) - padded
    slot = jnp.where(ids < groups, start[jnp.minimum(ids, groups - 1)] + rank, length)
    tile_group = used = None
    if tiled:
        ends = jnp.cumsum(padded // tile)
        tile_group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(length // tile),
                                                  side="right"), groups - 1)
        used = ends[-1]
    return Groups(slot, inverse(slot, length), sizes.astype(jnp.int32), tile_group, used,
                  tile)


def to_groups(rows: jax.Array, g: Groups) -> jax.Array:
    """Rows (M, D) into the grouped buffer (unused places zero)."""
    return move_rows(rows, g.back, g.slot)


def from_groups(buf: jax.Array, g: Groups) -> jax.Array:
    """The grouped buffer back to rows (M, F) in their order (zero for rows in no group)."""
    return move_rows(buf, g.slot, g.back)


def grouped_dot(buf: jax.Array, w: jax.Array, g: Groups, quant: str = "none",
                split_axis: str | None = None) -> jax.Array:
    """The grouped buffer (L, D) times each group's w[e] (E, D, F) -> (L, F); `quant` int8 |
    fp8: both operands quantized (maxgpt/quantize.py), with scales over all of D where D is
    split over mesh axis `split_axis` (tiled only: ragged_dot_qt takes no such hook)."""
    if g.tile_group is None:
        if quant != "none":
            return quantize.ragged_dot(buf, w, g.sizes, quant)
        return jax.lax.ragged_dot(buf, w, g.sizes)
    tiles = buf.reshape(-1, g.tile, buf.shape[-1])
    out = (_tiles_dot(tiles, w, g.tile_group, g.used) if quant == "none" else
           quantize.batched_dot(tiles, w[g.tile_group], quant, split_axis))
    return out.reshape(buf.shape[0], -1)


def _dropless_dispatch(x, experts, weights, valid, w, *, num_experts, ep, ep_axis, tp_axis,
                       quant):
    """Tokens x (B, T, D) through all their experts, grouped by expert for `grouped_dot`.
    Returns (y (B, T, D) fp32, zeros (B, 1): nothing is dropped)."""
    B, T, D = x.shape
    k, E = experts.shape[-1], num_experts
    local = E // ep
    N = B * T * k
    a = jnp.where(valid[..., None], experts, E).reshape(N)  # token-major assignments
    rows = jnp.broadcast_to(x.reshape(B * T, 1, D), (B * T, k, D)).reshape(N, D)
    if ep_axis:  # a buffer of N rows for each device, which sends buffer i to device i
        dest = a // local  # the device holding the expert; ep for padding (not sent)
        slot = jnp.where(dest < ep, dest * N + _ranks(dest, ep)[0], ep * N)
        back = inverse(slot, ep * N)
        send = move_rows(rows, back, slot).reshape(ep, N, D)
        ids = jnp.full((ep * N,), local, jnp.int32).at[slot].set(a % local, mode="drop")
        # what arrives is one buffer from every device
        rows = jax.lax.all_to_all(send, ep_axis, 0, 0, tiled=True).reshape(ep * N, D)
        a = jax.lax.all_to_all(ids.reshape(ep, N), ep_axis, 0, 0, tiled=True).reshape(-1)
    g = expert_groups(a, local)
    buf = to_groups(rows, g)

    def grouped(h, weight, split_axis=None):
        return grouped_dot(h, quantize.weight(weight, x.dtype), g, quant, split_axis)

    gate = None if w["gate"] is None else grouped(buf, w["gate"])
    out = grouped(_activate(grouped(buf, w["up"]), gate), w["down"], tp_axis)
    if tp_axis:
        out = jax.lax.psum(out, tp_axis)
    out = from_groups(out, g)  # (ep * N, D), rows in arrival order
    if ep_axis:
        out = jax.lax.all_to_all(out.reshape(ep, N, D), ep_axis, 0, 0, tiled=True)
        out = move_rows(out.reshape(ep * N, D), slot, back)  # (N, D), assignment order
    # padding's rows went to no expert and came back zero
    y = (out.astype(jnp.float32) * weights.reshape(N, 1)).reshape(B, T, k, D).sum(2)
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
        # in the compute dtype before shard_map: its entry all-gathers FSDP-split weights, and
        # a float32 copy of every expert would be twice the bytes (quantized weights go as
        # they are and are dequantized where they are used)
        def compute(p):
            if p is None:
                return None
            v = p[...]
            return v if isinstance(v, quantize.QArray) else v.astype(x.dtype)

        w = {"up": compute(self.up_proj), "down": compute(self.down_proj),
             "gate": compute(self.gate_proj)}
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
