"""Saved parameter trees against the model being built: the same names and shapes, up to
the layout a pipeline stores its stacked layers in.

A run's stacked-layer parameters are (L, ...) in depth order, or (repeats, L / repeats, ...)
under a circular pipeline schedule (maxgpt/pipeline.py); both are depth order once
flattened, so a checkpoint written under one layout restores under any other by a reshape.
Used by checkpoints (maxgpt/checkpoint.py) and by the Hugging Face import
(maxgpt/export.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec

from maxgpt.config import ConfigError


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in key_path)


def _shapes(tree: Any) -> dict[str, tuple]:
    return {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def relayout(saved: tuple, wanted: tuple) -> tuple[int, int] | None:
    """(leading axes of `saved`, of `wanted`) when the two shapes hold the same stacked
    layers in other pipeline layouts, (L, ...) and (repeats, L / repeats, ...), which a
    reshape turns into each other; None otherwise."""
    for lead in ((1, 2), (2, 1), (2, 2)):
        if (len(saved) > lead[0] and len(wanted) > lead[1]
                and saved[lead[0]:] == wanted[lead[1]:]
                and math.prod(saved[:lead[0]]) == math.prod(wanted[:lead[1]])):
            return lead
    return None


def check_architecture(saved_params: Any, abstract_params: Any, where: str) -> None:
    """Raise naming the first parameter whose name or shape differs (beyond a pipeline
    layout, `relayout`)."""
    saved, wanted = _shapes(saved_params), _shapes(abstract_params)
    for name in sorted(saved.keys() | wanted.keys()):
        have, want = saved.get(name), wanted.get(name)
        if have != want and (have is None or want is None or not relayout(have, want)):
            raise ConfigError(f"{where} holds a different architecture: parameter {name} is "
                              f"{have or 'absent'} there but {want or 'absent'} in this config")


def restore_targets(saved: Any, abstract: Any, shardings: Any
                    ) -> tuple[Any, Callable[[Any], Any]]:
    """Restore targets for `abstract` placed in `shardings`, from a checkpoint whose leaves
    have `saved` shapes (its metadata), and the function that finishes the restore: leaves
    saved in another pipeline layout are read in their own shape, split like the target on
    the axes the two share, then reshaped and moved into the target's layout."""
    saved_shapes = _shapes(saved)
    moves = {}

    def target(path, x, s):
        have = saved_shapes.get(_path(path), x.shape)
        lead = None if have == tuple(x.shape) else relayout(have, tuple(x.shape))
        if lead is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        spec = (*s.spec, *(None,) * (len(x.shape) - len(s.spec)))
        moves[_path(path)] = (x.shape, s)
        return jax.ShapeDtypeStruct(have, x.dtype, sharding=NamedSharding(
            s.mesh, PartitionSpec(*(None,) * lead[0], *spec[lead[1]:])))

    targets = jax.tree_util.tree_map_with_path(target, abstract, shardings)

    def finish(restored):
        def one(path, x):
            move = moves.get(_path(path))
            if move is None:
                return x
            shape, s = move
            return jax.jit(lambda a: a.reshape(shape), out_shardings=s)(x)

        return jax.tree_util.tree_map_with_path(one, restored)

    return targets, finish
