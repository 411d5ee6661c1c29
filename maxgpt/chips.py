"""The accelerators maxgpt knows: peak dense bf16 FLOP/s and memory per chip, in one table.

Numbers are the vendors' spec sheets (dense, no 2:4 sparsity). TPU slice names follow Google
Cloud: for v4 and v5p the number counts TensorCores (two per chip, so `v5p-256` is 128 chips);
for v5e (`v5litepod-N`, also written `v5e-N`) and v6e it counts chips.
"""

from __future__ import annotations

import dataclasses
import re

from maxgpt.config import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16: float  # FLOP/s per chip
    hbm_bytes: int  # per chip
    cores_per_chip: int  # how slice names count: TensorCores per chip
    device_kinds: tuple[str, ...]  # jax Device.device_kind values naming this chip
    chips_per_host: int = 4  # TPU VM hosts of multi-host slices; GPUs: a typical node
    torus_dims: int = 0  # TPU interconnect: 3 (v4, v5p) or 2 (v5e, v6e); 0 for GPUs


CHIPS = {chip.name: chip for chip in [
    Chip("v4", 275e12, 32 * GiB, 2, ("TPU v4",), torus_dims=3),
    Chip("v5e", 197e12, 16 * GiB, 1, ("TPU v5 lite", "TPU v5e"), torus_dims=2),
    Chip("v5p", 459e12, 95 * GiB, 2, ("TPU v5p", "TPU v5"), torus_dims=3),
    Chip("v6e", 918e12, 32 * GiB, 1, ("TPU v6 lite", "TPU v6e"), torus_dims=2),
    Chip("h200", 989e12, 141 * 10**9, 1, ("H200",), chips_per_host=8),
    Chip("h100", 989e12, 80 * 10**9, 1, ("H100",), chips_per_host=8),  # SXM
    Chip("a100", 312e12, 80 * 10**9, 1, ("A100",), chips_per_host=8),
]}
ALIASES = {"v5litepod": "v5e"}


def chip_for_device_kind(kind: str) -> Chip | None:
    """The Chip whose device_kinds match a jax Device.device_kind (most specific first)."""
    matches = [(len(k), c) for c in CHIPS.values() for k in c.device_kinds if k in kind]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def parse_slice(name: str) -> tuple[Chip, int]:
    """'v5p-256' -> (the v5p Chip, 128 chips); 'h100-8' -> (h100, 8)."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    kind = match and ALIASES.get(match.group(1), match.group(1))
    if not match or kind not in CHIPS:
        raise ConfigError(f"unknown accelerator slice {name!r}; write NAME-COUNT with NAME one "
                          f"of {', '.join([*CHIPS, *ALIASES])}, e.g. v5p-256 or v6e-64")
    chip, count = CHIPS[kind], int(match.group(2))
    if count % chip.cores_per_chip or count == 0:
        raise ConfigError(f"{name}: {chip.name} slices count TensorCores, "
                          f"{chip.cores_per_chip} per chip; use a multiple of "
                          f"{chip.cores_per_chip}")
    return chip, count // chip.cores_per_chip


def topology(chip: Chip, chips: int) -> str:
    """The slice's chip grid as GKE and the TPU API write it: v5p-256 (128 chips) -> '4x4x8',
    v6e-64 -> '8x8'. 3-D tori grow one axis at a time from 2x2x1; 2-D from 1x1."""
    if chip.torus_dims == 0:
        raise ConfigError(f"{chip.name} is not a TPU: it has no slice topology")
    if chips & (chips - 1):
        raise ConfigError(f"a {chip.name} slice of {chips} chips: maxgpt knows the power-of-two"
                          " shapes only")
    dims = [2, 2, 1] if chip.torus_dims == 3 and chips >= 4 else [1] * chip.torus_dims
    while dims[0] * dims[1] * (dims[2] if len(dims) > 2 else 1) < chips:
        smallest = min(range(len(dims)), key=lambda i: (dims[i], -i))
        dims[smallest] *= 2
    return "x".join(map(str, dims))
