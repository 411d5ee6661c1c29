"""Quantization, both kinds, with qwix (Google's JAX quantization library, what MaxText uses).

Training (`model.quantize: int8 | fp8`): every weight matmul of attention, the MLP and the
experts runs as a quantized dot — activations per token and weights per output channel, both
int8 (or fp8 e4m3) with absmax scales — through qwix's `dot_general_qt`, whose custom
gradient uses the quantized forward operands (a straight-through estimator: the rounding is
treated as the identity). On TPU the int8 x int8 dots accumulate in int32 on the MXU; on CPU
the quantized values are multiplied as float32 products instead (`_quantized_dot` says why;
no speed gain there either way, docs/benchmarks.md). Master weights, the
optimizer, embeddings, norms, the router and (unless `model.quantize_output`) the output
layer stay in their dtypes.

Inference (`maxgpt generate/eval --quantize int8 | int4`): weight-only. Each matmul weight
becomes a qwix `QArray` (int8 or int4 values and float scales, per output channel or per
group of `--quantize-group` inputs); the model's matmuls (`layers.matmul`, the experts' via
`weight`) dequantize them where they are used, so the device holds the low-bit values.

Why qwix's core ops rather than its `QtProvider` (interception of calls by module path): every
weight matmul here already passes through one function (`maxgpt/model/layers.py::matmul`, and
the experts' dots in `maxgpt/model/moe.py`), so calling the quantized dot there is explicit,
works unchanged inside the layer scan, remat, the pipeline's shard_map and the MoE dispatch,
and patches nothing at run time.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec as P
# qwix's quantized dot_general / ragged_dot with straight-through gradients (what its
# QtProvider calls); qwix is pinned to a minor version in setup.cfg for these paths.
from qwix._src.core import qarray as _qarray
from qwix._src.core.dot_general_qt import DotGeneralQtConfig, dot_general_qt
from qwix._src.core.ragged_dot_qt import RaggedDotQtConfig, ragged_dot_qt

from maxgpt.config import ConfigError
from maxgpt.sharding import platform

TRAINING = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}  # model.quantize (besides none)
WEIGHTS = {"int8": jnp.int8, "int4": jnp.int4}  # --quantize of generate/eval
WEIGHT_BITS = {"int8": 8, "int4": 4}

# The matmul weights quantized for inference, by parameter name, and the logical axes each
# one contracts with its input (the rest are output channels or stacked layers/experts).
CONTRACTING = {"q_proj": ("embed",), "k_proj": ("embed",), "v_proj": ("embed",),
               "o_proj": ("heads", "head_dim"), "up_proj": ("embed",),
               "gate_proj": ("embed",), "down_proj": ("mlp",)}

QArray = qwix.QArray


def _calibration(qtype, axis: str | None):
    """A calibration hook for qwix's absmax statistics, or None when there is nothing to do.

    int8: qwix's scale is absmax / 127.5 with values clipped to [-128, 127], so an extreme
    lands exactly on a rounding boundary (+-127.5), and a negative one goes to -127 or -128
    depending on how XLA happened to round the division: the same model then quantizes
    differently on one device and on a mesh. Scaled by 127.5 / 127, every extreme lands on
    +-127 (half a level of resolution given up for reproducible rounding).
    `axis`: a mesh axis that a shard_map splits the contracting axis over (the experts' down
    projection under tensor parallelism): absmax over its shards (pmax), so the scales are
    those of the whole axis, as on one device."""
    widen = qtype == jnp.int8
    if not widen and axis is None:
        return None

    def hook(calibration):
        if axis is not None:
            calibration = {k: jax.lax.pmax(v, axis) for k, v in calibration.items()}
        if widen:
            calibration = {k: v * (127.5 / 127) for k, v in calibration.items()}
        return calibration
    return hook


def _fake_quantized(x: jax.Array, qtype, contracting, axis: str | None) -> jax.Array:
    """x rounded to `qtype` with absmax scales over its contracting axes, in float32 (exact
    products of the quantized values, as the int8 dot's int32 sums are)."""
    x = x.astype(jnp.float32)
    how = _qarray.HowToQuantize(qtype=qtype, calibration_method="absmax", channelwise_axes=[
        i for i in range(x.ndim) if i not in contracting])
    calibration = _qarray.calibrate(x, how)
    if (hook := _calibration(qtype, axis)) is not None:
        calibration = hook(calibration)
    scale, zero_point = _qarray.compute_scale_zero_point(calibration, qtype)
    return qwix.dequantize(_qarray.quantize_with_scale_zero_point(x, qtype, scale, zero_point))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _emulated_dot(x, w, dims, mode, axis):
    return _emulated_fwd(x, w, dims, mode, axis)[0]


def _emulated_fwd(x, w, dims, mode, axis):
    (x_c, w_c), _ = dims
    xq, wq = (_fake_quantized(x, TRAINING[mode], x_c, axis),
              _fake_quantized(w, TRAINING[mode], w_c, axis))
    dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))  # the gradients' dtypes
    return jax.lax.dot_general(xq, wq, dims).astype(x.dtype), (xq, wq, dtypes)


def _emulated_bwd(dims, mode, axis, residuals, g):
    # the gradient of the dot at the quantized operands, as qwix's dot_general_qt computes it
    # (straight through the rounding; absmax scales are never clipped)
    xq, wq, dtypes = residuals
    grads = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), xq, wq)[1](
        g.astype(jnp.float32))
    return tuple(d.astype(t.dtype) for d, t in zip(grads, dtypes))


_emulated_dot.defvjp(_emulated_fwd, _emulated_bwd)


def _quantized_dot(x, w, dims, mode, axis=None):
    # XLA:CPU computes the int8 x int8 -> int32 dot wrongly inside some sharded programs
    # (8 devices, (256, 64) x (64, 96): 18% of the products off by up to 255 units, while
    # the quantized operands were identical and a one-device program was exact), and would
    # gain no speed from it: there the quantized values are multiplied as floats, exact up
    # to float rounding, with the same straight-through gradient.
    if platform() == "cpu":
        return _emulated_dot(x, w, dims, mode, axis).astype(x.dtype)
    qtype = TRAINING[mode]
    hook = _calibration(qtype, axis)
    config = DotGeneralQtConfig(lhs_qtype=qtype, rhs_qtype=qtype, lhs_collect_quant_stat=hook,
                                rhs_collect_quant_stat=hook)
    return dot_general_qt(x, w, dims, config).astype(x.dtype)


def dot(x: jax.Array, w: jax.Array, mode: str) -> jax.Array:
    """(M, K) @ (K, N), both operands quantized (`mode` int8 | fp8), in x's dtype."""
    return _quantized_dot(x, w, (((1,), (0,)), ((), ())), mode)


def batched_dot(x: jax.Array, w: jax.Array, mode: str, axis: str | None = None) -> jax.Array:
    """(G, M, K) @ (G, K, N) -> (G, M, N), quantized; G (experts, tiles) is a batch axis:
    every group has its own scales. `axis`: the mesh axis K is split over inside a
    shard_map, if it is."""
    return _quantized_dot(x, w, (((2,), (1,)), ((0,), (0,))), mode, axis)


def ragged_dot(x: jax.Array, w: jax.Array, sizes: jax.Array, mode: str) -> jax.Array:
    """`jax.lax.ragged_dot` (rows of x (M, K) grouped by `sizes`, times w (G, K, N)),
    quantized."""
    qtype = TRAINING[mode]
    return ragged_dot_qt(x, w, sizes, RaggedDotQtConfig(lhs_qtype=qtype, rhs_qtype=qtype)
                         ).astype(x.dtype)


def weight(w: jax.Array | QArray, dtype) -> jax.Array:
    """A weight in the compute dtype: quantized weights dequantized (where they are used,
    so XLA fuses it into the consumer), others cast."""
    if isinstance(w, QArray):
        return qwix.dequantize(w.astype(dtype))
    return w.astype(dtype)


def weight_dot(x: jax.Array, w: QArray) -> jax.Array:
    """(M, K) @ (K, N) with a quantized (K, N) weight, in x's dtype: qwix applies per-channel
    scales to the product and per-group scales to the weight."""
    return qwix.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ()))).astype(x.dtype)


def int8_vectors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (..., H) as int8 values and a float32 scale (..., 1) per vector of its last axis
    (absmax): the int8 KV cache's keys and values, a scale per token and head."""
    q = qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=range(x.ndim - 1))
    return q.qvalue, q.scale


# --- weight-only quantization of a trained model -------------------------------------------


def check_weights(kind: str, group: int, model_cfg) -> None:
    """The user's error for a weight quantization that cannot be done (before a checkpoint
    is read)."""
    if kind not in WEIGHTS:
        raise ConfigError(f"--quantize must be one of {', '.join(WEIGHTS)}, got {kind!r}")
    if group < 0:
        raise ConfigError(f"--quantize-group must be >= 0 (0: one scale per output channel), "
                          f"got {group}")
    widths = {"model.embed_dim": model_cfg.embed_dim, "model.mlp_dim": model_cfg.mlp_dim,
              "head_dim (model.embed_dim / model.num_heads)": model_cfg.head_dim}
    bad = [f"{name}={size}" for name, size in widths.items() if group and size % group]
    if bad:
        raise ConfigError(f"--quantize-group={group} must divide every width a weight is "
                          f"grouped along, not {', '.join(bad)}")


def _layout(path: tuple[str, ...], names: tuple, group: int):
    """How the weight at `path` (logical axes `names`) is quantized: (channelwise axes, tiled
    axes, contracting axes), or None for parameters that stay as they are (embeddings, norms,
    biases, the router, the output layer). A scale per output channel (and per layer and
    expert) over all inputs, or with `group` over groups of that many along the last
    contracting axis (o_proj: one head's dims, so a group never spans two heads)."""
    contract = CONTRACTING.get(path[-1])
    if contract is None or not set(contract) <= set(names):
        return None  # a bias of the same name has no contracting axis
    axes = [i for i, n in enumerate(names) if n in contract]
    if group:
        return [i for i in range(len(names)) if i != axes[-1]], {axes[-1]: group}, axes
    return [i for i in range(len(names)) if i not in axes], {}, axes


def _plan(names: dict, shardings: dict, kind: str, group: int):
    """Per parameter leaf (in tree order): its `_layout` and the sharding of what it becomes,
    and the tree's structure. A QArray's values keep the weight's sharding; its scales are
    split like it except along the contracting axes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shardings)
    axis_names = jax.tree.leaves(names, is_leaf=lambda n: isinstance(n, tuple))
    layouts, out = [], []
    for (path, where), n in zip(leaves, axis_names):
        layout = _layout(tuple(getattr(k, "key", k) for k in path), n, group)
        layouts.append(layout)
        if layout is None:
            out.append(where)
            continue
        spec = tuple(where.spec) + (None,) * (len(n) - len(where.spec))
        scale_spec = P(*(None if i in layout[2] else s for i, s in enumerate(spec)))
        out.append(QArray(qvalue=where, scale=NamedSharding(where.mesh, scale_spec),
                          qtype=WEIGHTS[kind]))
    return layouts, out, treedef


def _quantizer(layouts, kind):
    def work(arrays):
        return [x if layout is None else
                qwix.quantize(x.astype(jnp.float32), WEIGHTS[kind], channelwise_axes=layout[0],
                              tiled_axes=layout[1])
                for x, layout in zip(arrays, layouts)]
    return work


def quantize_weights(params: dict, names: dict, shardings: dict, kind: str, group: int
                     ) -> tuple[dict, dict]:
    """Params (a pure dict in depth order; their logical axis names and NamedShardings
    beside them) with every attention, MLP and expert matmul weight as a QArray of `kind`
    (int8 | int4), symmetric absmax scales in float32; and the shardings of the result."""
    layouts, out, treedef = _plan(names, shardings, kind, group)
    done = jax.jit(_quantizer(layouts, kind), out_shardings=out)(jax.tree.leaves(params))
    return (jax.tree_util.tree_unflatten(treedef, done),
            jax.tree_util.tree_unflatten(treedef, out))


def quantized_target(abstract: dict, names: dict, shardings: dict, kind: str, group: int
                     ) -> tuple[dict, dict]:
    """What `quantize_weights` makes of parameters of shapes `abstract`, as placed
    ShapeDtypeStructs (a restore target), and its shardings; nothing is computed."""
    layouts, out, treedef = _plan(names, shardings, kind, group)
    shapes = jax.eval_shape(_quantizer(layouts, kind), jax.tree.leaves(abstract))
    placed = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                  sharding=where),
                          shapes, out)
    return (jax.tree_util.tree_unflatten(treedef, placed),
            jax.tree_util.tree_unflatten(treedef, out))


def planned_bytes(abstract: dict, names: dict, kind: str | None, group: int = 0) -> int:
    """Bytes `quantize_weights` would make of parameters of shapes `abstract` (a pure dict;
    None: as they are), int4 counted packed: for `maxgpt params`, with nothing allocated."""
    total = 0
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    axis_names = jax.tree.leaves(names, is_leaf=lambda n: isinstance(n, tuple))
    for (path, x), n in zip(leaves, axis_names):
        layout = None if kind is None else _layout(tuple(getattr(k, "key", k) for k in path),
                                                   n, group)
        if layout is None:
            total += x.size * x.dtype.itemsize
            continue
        channelwise, tiled, _ = layout
        scales = math.prod(x.shape[i] for i in channelwise) * math.prod(
            x.shape[a] // t for a, t in tiled.items())
        total += math.ceil(x.size * WEIGHT_BITS[kind] / 8) + 4 * scales
    return total


def weight_bytes(params: Any) -> int:
    """Bytes the parameters take where int4 is packed two to a byte (TPU, GPU; XLA:CPU keeps
    a byte each): values at their bit width, scales and other parameters at their dtype's."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            bits = 4 if leaf.qvalue.dtype == jnp.int4 else 8 * leaf.qvalue.dtype.itemsize
            total += math.ceil(leaf.qvalue.size * bits / 8)
            total += leaf.scale.size * leaf.scale.dtype.itemsize
        else:
            total += leaf.size * leaf.dtype.itemsize
    return total
