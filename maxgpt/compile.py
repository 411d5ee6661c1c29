"""Ahead-of-time compilation of the real train step for a TPU slice, on any machine.

`maxgpt compile --config FILE --topology v5p-256 [--num-slices N]` asks libtpu (the `[tpu]`
extra) for the slice's device topology (`jax.experimental.topologies.get_topology_desc`),
builds the run's mesh over those devices, and compiles the train step exactly as `maxgpt
train` would, without a single TPU. XLA's memory analysis of the compiled step gives the
bytes each chip needs (parameters, optimizer state and batch in; outputs not aliased to them;
temporaries), compared with the chip's HBM from `maxgpt/chips.py`. When the TPU compiler
itself refuses the program for want of HBM, the report carries its temporaries and our count
of the per-device arguments, and does not fit.

With several slices the devices of all slices form one mesh whose `stage` and `data` axes
span the slices (pipeline stages and data parallelism over DCN, the other axes within a
slice's ICI; sharding.make_mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax

from maxgpt.chips import Chip, parse_slice, topology
from maxgpt.config import Config, ConfigError, load_config
from maxgpt.flops import flops_per_token

# libtpu's names for the chip generations, and its core layout per chip
TPU_NAMES = {"v4": ("v4", "megacore"), "v5p": ("v5", "megacore"), "v5e": ("v5e", "default"),
             "v6e": ("v6e", "default")}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    devices: int
    mesh: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops_per_step: float  # maxgpt.flops (XLA's own count sees a scanned layer only once)
    compile_s: float
    pipeline: str  # the pipeline schedule and its bubble (mesh.stage > 1), else ""
    state_bytes: int  # per device: weights and optimizer state (part of the arguments)
    # dots of the optimised program on int8/fp8 operands (model.quantize); None when the
    # compiler stopped for want of HBM (no program to count in)
    quantized_dots: int | None = 0
    # one device's weights for generate/eval: in model.param_dtype and quantized (weight_bytes)
    weight_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    remat: str = "none"  # model.remat, for the hint

    @property
    def bytes_per_device(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.bytes_per_device <= self.hbm_bytes

    @property
    def hint(self) -> str:
        """What to change when the step does not fit ("" when it does)."""
        from maxgpt import sharding

        return "" if self.fits else sharding.memory_hint(
            self.mesh, self.state_bytes, self.temp_bytes, self.hbm_bytes, self.remat)


def topology_devices(chip: Chip, chips: int, num_slices: int = 1) -> list:
    """Abstract devices of `num_slices` slices of `chips` chips each (libtpu, no TPU)."""
    try:
        from jax.experimental import topologies
        import libtpu  # noqa: F401  (only to fail early with a clear message)
    except ImportError:
        raise ConfigError("maxgpt compile needs libtpu: pip install -e '.[tpu]' (and keep "
                          "JAX_PLATFORMS=cpu for everything else on a machine without TPUs)"
                          ) from None
    if chip.name not in TPU_NAMES:
        raise ConfigError(f"{chip.name} is not a TPU: maxgpt compile targets TPU slices")
    name, cores = TPU_NAMES[chip.name]
    per_host = (2, 4, 1) if chips == 8 and chip.cores_per_chip == 1 else (
        (2, 2, 1) if chips >= 4 else (1, chips, 1))  # 8-chip v5e/v6e hosts are single-host
    desc = topologies.get_topology_desc(
        topology_name=f"{name}:{topology(chip, chips)}", platform="tpu",
        chip_config_name=cores, chips_per_host_bounds=per_host, num_slices=num_slices)
    return list(desc.devices)


# The TPU compiler refuses a program whose temporaries exceed HBM, e.g. "RESOURCE_EXHAUSTED:
# Ran out of memory on HBM, the total memory required for HLO temporaries (164.05G) exceeds
# available HBM (15.75G)."
_OUT_OF_HBM = re.compile(r"HLO temporaries \((\d+(?:\.\d+)?)([KMGT])\)")


def compile_for(cfg: Config, slice_name: str, num_slices: int = 1) -> CompileReport:
    from maxgpt import sharding
    from maxgpt.train import _abstract_batch, abstract_state, build_trainer

    chip, chips = parse_slice(slice_name)
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be at least 1, got {num_slices}")
    devices = topology_devices(chip, chips, num_slices)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = build_trainer(cfg, mesh)
    state, batch = abstract_state(trainer), _abstract_batch(trainer)
    state_bytes = sharding.shard_bytes(state, trainer.state_shardings)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    report = functools.partial(
        CompileReport, topology=f"{slice_name}" + (f" x {num_slices} slices"
                                                   if num_slices > 1 else ""),
        devices=len(devices), mesh=dict(mesh.shape), hbm_bytes=chip.hbm_bytes,
        flops_per_step=flops_per_token(cfg.model, cfg.train.seq_len) * tokens,
        pipeline="" if trainer.schedule is None else trainer.schedule.describe(),
        state_bytes=state_bytes, weight_bytes=weight_bytes(cfg, trainer.param_shardings),
        remat=cfg.model.remat)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        try:
            compiled = trainer.step_fn.lower(state, batch).compile()
        except jax.errors.JaxRuntimeError as e:
            found = _OUT_OF_HBM.search(str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not found:
                raise
            # Does not fit: the compiler's temporaries, and our count of the arguments.
            temp = float(found.group(1)) * 2 ** (10 * " KMGT".index(found.group(2)))
            args = state_bytes + sharding.shard_bytes(
                batch, [trainer.batch_sharding] * len(batch))
            return report(argument_bytes=args, output_bytes=0, alias_bytes=0,
                          temp_bytes=int(temp), code_bytes=0,
                          compile_s=time.perf_counter() - start, quantized_dots=None)
        seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return report(argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                  code_bytes=memory.generated_code_size_in_bytes, compile_s=seconds,
                  quantized_dots=quantized_dots(compiled.as_text()))


def weight_bytes(cfg: Config, shardings: dict | None = None) -> dict[str, int]:
    """Bytes of the model's weights in model.param_dtype and quantized as `maxgpt generate/
    eval --quantize int8|int4` would (matmul weights, scales per output channel, int4
    packed), nothing allocated: of the whole model, or with `shardings` (the parameters'
    on a mesh, `Trainer.param_shardings`) of one device's shard (scales are split like the
    output channels of their weight, and whole where only its contracted axis is split, as
    `quantize.quantize_weights` places them)."""
    from flax import nnx

    from maxgpt.quantize import WEIGHTS, planned_bytes
    from maxgpt.sharding import param_names
    from maxgpt.train import abstract_model

    abstract = abstract_model(cfg)[1]
    shapes, names = nnx.to_pure_dict(abstract), param_names(abstract)
    if shardings is not None:
        shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(s.shard_shape(x.shape),
                                                                x.dtype), shapes, shardings)
    return {cfg.model.param_dtype: planned_bytes(shapes, names, None),
            **{kind: planned_bytes(shapes, names, kind) for kind in WEIGHTS}}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[")
_DOT = re.compile(r" (?:dot|convolution)\(([^)]*)\)")
_LOW_PRECISION = ("s8", "u8", "s4", "u4", "f8")


def quantized_dots(hlo: str) -> int:
    """Dots (and the convolutions TPU programs express them as) of an optimised HLO module
    whose operands are 8-bit or 4-bit integers or floats: the matmuls model.quantize made
    low-precision, as the compiler will run them."""
    types, count = {}, 0
    for line in hlo.splitlines():
        found = _INSTRUCTION.match(line)
        if found is None:
            continue
        types[found.group(1)] = found.group(2)
        dot = _DOT.search(line)
        if dot and any(types.get(o.strip().lstrip("%"), "").startswith(_LOW_PRECISION)
                       for o in dot.group(1).split(",")):
            count += 1
    return count


def find_mesh(model: dict, slice_name: str, seq_len: int = 4096,
              echo=lambda text: None) -> tuple[dict | None, CompileReport | None]:
    """The first mesh for which the train step of `model` (model.* keys; bf16 compute, full
    remat, one sequence of `seq_len` per chip) compiles within HBM on `slice_name`: fully
    sharded data parallelism, then fsdp x tensor 2, 4, 8, then the same split into 2 or 4
    pipeline stages (when the layers divide). (None, None) if none does."""
    _, chips = parse_slice(slice_name)
    base = [f"model.{k}={v}" for k, v in model.items()] + [
        f"model.max_seq_len={seq_len}", f"train.seq_len={seq_len}",
        f"train.batch_size={chips}", "model.dtype=bfloat16", "model.remat=full",
        "model.tie_embeddings=false", "mesh.data=1"]
    for stage in (1, 2, 4):
        if chips % stage or model["num_layers"] % stage:
            continue
        for tensor in (1, 2, 4, 8):
            if (chips // stage) % tensor or model["num_heads"] % tensor:
                continue
            mesh = {"fsdp": chips // (stage * tensor), "tensor": tensor}
            if stage > 1:
                mesh = {"stage": stage, **mesh}
            keys = [f"mesh.{axis}={size}" for axis, size in mesh.items()]
            report = compile_for(load_config(None, [*base, *keys]), slice_name)
            echo(f"  mesh {' '.join(f'{a}={n}' for a, n in mesh.items())}: "
                 f"{report.bytes_per_device / 2**30:.1f} of {report.hbm_bytes / 2**30:.0f} GiB")
            if report.fits:
                return mesh, report
    return None, None
