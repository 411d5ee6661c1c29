"""Token cross-entropy a piece of the sequence at a time, so the logits never exist whole.

The output logits are the largest activation of a language model: B x T x V floats (4 GiB
for one 8192-token sequence of Llama 3's 128,256-piece vocabulary in fp32), and autodiff
keeps them, or their gradient, alive through the backward pass. Here the final hidden
states are cut into pieces of `train.loss_chunk` positions; a `lax.scan` computes each
piece's logits, log-partition and target logit, adds them up, and drops the logits. In the
backward pass each piece's logits are recomputed (`jax.checkpoint`), so peak memory holds
one piece's logits instead of the whole sequence's, for one extra output-projection matmul
forward (about 1/3 of the output layer's cost).

`train.loss_chunk: 0` chooses: the whole sequence at once on CPU (memory is plentiful there
and the extra matmul is not free) and pieces of AUTO_CHUNK positions on TPU and GPU when the
sequence is longer than that and a multiple of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxgpt import sharding

AUTO_CHUNK = 1024


def chunk_size(requested: int, seq_len: int) -> int:
    """Positions per piece on each device (its part of the sequence under context
    parallelism): `requested` if set, else the automatic choice above."""
    if requested:
        return requested
    local = seq_len // sharding.axis_size("seq")
    if sharding.platform() == "cpu" or local <= AUTO_CHUNK or local % AUTO_CHUNK:
        return local
    return AUTO_CHUNK


def token_losses(logits_fn, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """(sum of weights * (log Z - target logit), sum of weights * (log Z)^2) over (B, T),
    where logits = logits_fn(hidden) (fp32, (..., V)); computed `chunk` positions of each
    device's part of the sequence at a time."""
    def piece(h, t, w):
        logits = logits_fn(h)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return ((log_z - target_logit) * w).sum(), (jnp.square(log_z) * w).sum()

    B, T = targets.shape
    shards = sharding.axis_size("seq")  # context parallelism: T is split in `shards` parts
    if chunk * shards >= T:
        return piece(hidden, targets, weights)

    def split(a):  # (B, T, ...) -> (pieces, B, shards * chunk, ...): each piece takes
        # `chunk` positions from every device's part, so no position changes device
        a = a.reshape(B, shards, T // (shards * chunk), chunk, *a.shape[2:])
        a = jnp.moveaxis(a, 2, 0).reshape(T // (shards * chunk), B, shards * chunk,
                                           *a.shape[4:])
        return sharding.constrain(a, (None, "batch", "seq", None)[:a.ndim])

    recomputed = jax.checkpoint(piece)  # backward: recompute the piece's logits, keep none

    def add(total, pieces):
        nll, z = recomputed(*pieces)
        return (total[0] + nll, total[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(add, (zero, zero),
                               (split(hidden), split(targets), split(weights)))
    return nll, z
