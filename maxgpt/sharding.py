"""Where things live on the device mesh: the mesh, and the ONE logical-axis -> mesh-axis table.

Model code names the axes of its parameters and activations logically (`embed`, `heads`, ...).
This file alone knows the mesh axes:

- `stage`:   pipeline parallelism (GPipe, Huang et al. 2019; circular schedules as in
             Narayanan et al. 2021): the stacked layers are split into stages, one per
             device of the axis, and microbatches flow through them (maxgpt/pipeline.py).
             With several slices it runs across them first: between stages only one
             microbatch's activations travel per step of the schedule.
- `data`:    pure data parallelism; parameters replicated.
- `fsdp`:    data parallelism with parameters (and optimizer state) sharded along `embed`
             (ZeRO-3 style; XLA all-gathers weights before use and reduce-scatters gradients).
- `context`: context parallelism: every sequence is split along its length (`seq`);
             attention gathers keys and values over the axis (model/attention.py), with the
             sequence in a load-balanced order (`balanced_order`). Like `fsdp` it also splits
             parameters and optimizer state along `embed`, so it needs no fsdp axis to fit.
- `expert`:  expert parallelism (GShard, Lepikhin et al. 2020): each mixture-of-experts
             layer's experts are split over it and tokens travel to their experts' devices
             with all-to-all (model/moe.py); everywhere else it is one more data axis.
- `tensor`:  Megatron-style tensor parallelism (Shoeybi et al. 2019): attention heads, MLP
             hidden units and the vocabulary are split; one all-reduce after attention and
             one after the MLP.

A mesh is a config change (`mesh.fsdp=8`), never a code change. All use of Flax variable
metadata is kept here so that an NNX API rename touches one file.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from maxgpt.config import ConfigError, MeshConfig

# Outermost first: the order in which a slice's devices (and slices) are laid out. Axes that
# talk per layer (tensor, expert, context, fsdp) are innermost, on the fastest links.
MESH_AXES = MeshConfig.AXES

# logical axis -> mesh axes, tried in order. A mesh axis is used at most once per array
# and only where it divides the dimension; otherwise that dimension stays replicated
# (e.g. a single kv head under tensor parallelism).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    # the batch axes that do not split a weight's width: an embedding lookup's rows
    # (model/transformer.py `lookup`), read by a whole FSDP group from its table shards
    "lookup_batch": ("data", "expert"),
    "experts": ("expert",),
    "embed": ("fsdp", "context"),  # parameters; activations' `seq` takes context first
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "seq": ("context",),
    "layers": ("stage",),  # a stacked parameter's layers: stage s holds its share of them
    "stages": ("stage",),  # the pipeline's per-stage activations (maxgpt/pipeline.py)
    "repeats": (),  # a circular pipeline's layer groups per stage (pipeline.to_stored)
    "norm": (),
    "position": (),
}


def _slice_count(devices: Sequence[jax.Device]) -> int:
    """TPU slices among `devices` (multi-slice: `slice_index`); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def resolve_mesh_shape(cfg: MeshConfig, devices: Sequence[jax.Device]) -> dict[str, int]:
    """Every axis's size over `devices`: -1 takes the rest; `mesh.fsdp=0` (auto, the
    default) is 1 on CPU (simulated devices share one host's memory: plain data
    parallelism) and elsewhere FSDP over each slice, with `data` (when -1) across the
    slices: a model whose replicated weights and AdamW state would not fit is split."""
    sizes, num_devices = cfg.axes(), len(devices)
    if sizes["fsdp"] == 0:  # auto
        sizes["fsdp"] = 1
        if devices[0].platform != "cpu":
            if sizes["data"] == -1:  # data across the slices (those stages leave), fsdp the rest
                slices = _slice_count(devices)
                sizes["data"], sizes["fsdp"] = slices // math.gcd(sizes["stage"], slices), -1
            elif -1 not in sizes.values():  # fsdp the rest, after an explicit data axis
                sizes["fsdp"] = -1
    known = math.prod(v for v in sizes.values() if v != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(
                    f"mesh axes {sizes} cannot fill {num_devices} devices: "
                    f"{known} does not divide {num_devices}")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        shape = "x".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "data=1"
        raise ConfigError(
            f"mesh {shape} has {math.prod(sizes.values())} devices but {num_devices} are "
            f"available; make the product {num_devices} or set one axis to -1")
    return sizes


def shard_bytes(tree, shardings) -> int:
    """Bytes of one device's shard of every array in `tree` (the largest shard)."""
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def memory_hint(sizes: dict[str, int], state_bytes: int, temp_bytes: int,
                capacity: int, remat: str = "none") -> str:
    """What to change, mesh keys first, when a train step needs more than `capacity` bytes
    per device: `state_bytes` are a device's weights and optimizer state, its temporaries
    mostly activations; `remat`: the model's model.remat (full is not suggested again)."""
    hints = []
    if state_bytes > min(capacity, temp_bytes) and sizes["data"] > 1:
        hints.append(f"split the weights and optimizer state over the data axis too "
                     f"(mesh.data=1 mesh.fsdp={sizes['data'] * sizes['fsdp']}, or keep "
                     f"mesh.data at the slice count)")
    if state_bytes > capacity:  # they alone do not fit
        hints.append("use more devices or pipeline stages (mesh.stage)")
    if temp_bytes > capacity / 2 or not hints:
        hints.append("shrink the activations: " + ("" if remat == "full" else
                                                    "model.remat=full, ")
                     + "a higher train.microbatches or lower train.batch_size, mesh.context "
                     "for long sequences, train.loss_chunk")
    return "; ".join(hints)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over `devices` (default: all). Devices of several TPU slices (multi-slice,
    `slice_index`) get a hybrid mesh: the slices are spread over `stage` first and then
    `data`, the two axes whose traffic crosses the data-center network (DCN) well (one
    microbatch of activations between stages; one gradient reduction per step across data
    replicas), and every other axis stays within a slice's ICI."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = _slice_count(devices)
    if slices > 1:
        across_stage = math.gcd(sizes["stage"], slices)
        across_data = slices // across_stage
        if sizes["data"] % across_data:
            raise ConfigError(
                f"{slices} slices need mesh.stage x mesh.data to be a multiple of {slices} "
                f"(the axes that run across slices), got stage={sizes['stage']} x "
                f"data={sizes['data']}")
        from jax.experimental import mesh_utils

        across = {"stage": across_stage, "data": across_data}
        within = tuple(sizes[a] // across.get(a, 1) for a in MESH_AXES)
        grid = mesh_utils.create_hybrid_device_mesh(
            within, tuple(across.get(a, 1) for a in MESH_AXES), devices,
            allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # e.g. stage=2 x fsdp=32 on a 4x4x4 torus: an axis of 2
        from jax.experimental import mesh_utils  # splits a physical axis of 4

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose axes have logical `names`."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        chosen = []
        for axis in RULES.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def platform() -> str:
    """What the code is traced for: the current mesh's platform (`tpu` when compiling ahead
    of time for a TPU slice on a CPU host, `maxgpt compile`), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
    """A parameter tagged with logical axis names.

    Flax's eager sharding is off: placement is decided once, by `param_shardings`, when the
    whole model is initialised under jit (train.init_state), never per variable.
    """
    assert len(axes) == len(shape), (axes, shape)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_names(abstract_state: nnx.State) -> dict:
    """Every parameter's logical axis names, as a pure dict shaped like the parameters."""

    def one(var: nnx.Variable) -> tuple:
        return tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))

    return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=_is_variable))


def param_shardings(names: dict, shapes: dict, mesh: Mesh) -> dict:
    """NamedShardings for parameters of logical `names` (param_names) and `shapes` (arrays
    or ShapeDtypeStructs), both pure dicts shaped like the parameters."""
    return jax.tree.map(lambda n, x: NamedSharding(mesh, logical_to_spec(n, x.shape, mesh)),
                        names, shapes, is_leaf=lambda n: isinstance(n, tuple))


def axis_size(name: str, mesh=None) -> int:
    """Devices a dimension of logical axis `name` is split over at most (the current mesh by
    default; 1 outside one)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in RULES[name])


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes of logical axis `name`: for a `shard_map` over them and collectives
    across them (maxgpt/pipeline.py's loop over `stages`)."""
    return RULES[name]


def balanced_order(seq_len: int) -> np.ndarray | None:
    """The order in which a sequence is laid out over the context axis: None without one;
    with C devices, token indices cut into 2C chunks of which device i holds chunks i and
    2C - 1 - i. Under causal attention a query's work grows with its index, so every
    device then does the same work (Megatron-LM's and MaxText's load balancing); in plain
    order the last device would do 2C - 1 times the first one's."""
    shards = axis_size("seq")
    if shards == 1:
        return None
    chunks = np.arange(seq_len).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]])
                           for i in range(shards)])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (B, T): sequences split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"], None))


def batch_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, ...]:
    """The rows of every global batch that this process's devices hold, ascending: what the
    process feeds (`global_batch`). Usually one contiguous range, but any set works (a
    multi-host TPU mesh may give a host rows 0, 1, 6 and 15); processes whose devices hold
    the same rows (a model axis spanning hosts) feed the same data."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((batch_size, 1)).values():
        rows.update(range(*idx[0].indices(batch_size)))
    return tuple(sorted(rows))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                 batch_size: int) -> dict[str, jax.Array]:
    """One global batch from every process's own rows (`batch_rows`, in that order): each
    lands on the process's devices, and no process ever holds (or reads) the whole batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in local.items()}


def data_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the data-parallel mesh axes."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def per_device(mesh: Mesh) -> NamedSharding:
    """A 1-D array of one element per device of the mesh (host-side votes, maxgpt/checkpoint)."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))
