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

When the sequence is one piece (CPU's choice) and the output matmul is not quantized,
training uses `linear_cross_entropy` instead: the same sums, with the gradient computed in
the forward pass. The logits give the loss and, at once, d(loss)/d(logits) =
w * ((1 + 2 z_loss log Z) softmax - onehot), which two matmuls turn into the gradients of
the hidden states and of the output matrix; nothing of size B x T x V is kept for the
backward pass and none of autodiff's extra passes over the softmax are made. The output
layer's forward and backward took 0.8x the time at the CPU benchmark shape
(docs/benchmarks.md). In pieces it would hold the whole output matrix's fp32 gradient
through the scan over the pieces (+0.22 GiB per chip for llama3-8b on v5p-8, by AOT
compile), so there the recomputing path stays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from maxgpt import sharding
from maxgpt.model.transformer import output_logits

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

    if pieces(targets.shape[1], chunk) == 1:
        return piece(hidden, targets, weights)
    recomputed = jax.checkpoint(piece)  # backward: recompute the piece's logits, keep none

    def add(total, pieces):
        nll, z = recomputed(*pieces)
        return (total[0] + nll, total[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(add, (zero, zero),
                               tuple(_split(a, chunk) for a in (hidden, targets, weights)))
    return nll, z


def pieces(seq_len: int, chunk: int) -> int:
    """How many pieces token_losses cuts a sequence of seq_len into."""
    return max(seq_len // (chunk * sharding.axis_size("seq")), 1)


def _split(a: jax.Array, chunk: int) -> jax.Array:
    """(B, T, ...) -> (pieces, B, shards * chunk, ...): each piece takes `chunk` positions
    from every device's part of the sequence (context parallelism splits T in `shards`
    parts), so no position changes device."""
    B, T, shards = a.shape[0], a.shape[1], sharding.axis_size("seq")
    a = a.reshape(B, shards, T // (shards * chunk), chunk, *a.shape[2:])
    a = jnp.moveaxis(a, 2, 0).reshape(T // (shards * chunk), B, shards * chunk, *a.shape[4:])
    return sharding.constrain(a, (None, "batch", "seq", None)[:a.ndim])


def _loss_and_grads(x, w, targets, weights, z_loss: float, vocab: int):
    """(nll, z, dx, dw) for x (B, T, D), w (D, V), where nll and z are the sums of
    token_losses and dx, dw the gradients of nll + z_loss * z (dw in fp32)."""
    logits = _logits(x, w, vocab)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = ((log_z - target_logit) * weights).sum()
    z = (jnp.square(log_z) * weights).sum()
    # d/dlogits of w (log Z - logit_t) + z_loss w (log Z)^2
    scale = weights * (1.0 + 2.0 * z_loss * log_z)
    hit = jnp.arange(w.shape[1]) == targets[..., None]  # (B, t, V) one-hot of the targets
    dlogits = jnp.exp(logits - log_z[..., None]) * scale[..., None] - jnp.where(
        hit, weights[..., None], 0.0)
    dlogits = sharding.constrain(dlogits.astype(x.dtype), ("batch", "seq", "vocab"))
    dx = jnp.einsum("btv,dv->btd", dlogits, w)
    dw = jnp.einsum("btd,btv->dv", x, dlogits, preferred_element_type=jnp.float32)
    return nll, z, dx, sharding.constrain(dw, (None, "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def linear_cross_entropy(x, w, targets, weights, z_loss: float, vocab: int):
    """(nll + z_loss * z, nll, z) of token_losses for logits = x @ w over the whole sequence
    (x (B, T, D) final hidden states, w (D, V) the output matrix, both in the compute dtype;
    columns from `vocab` on are padding), with the gradient of the first output computed in
    the forward pass (module docstring). nll and z are for reporting: differentiating them
    is refused (their gradients are not computed)."""
    nll, z = token_losses(functools.partial(_logits, w=w, vocab=vocab), x, targets, weights,
                          targets.shape[1])  # not differentiated (evaluation): no gradients
    return nll + z_loss * z, nll, z


def _logits(x, w, vocab: int):
    return output_logits(jnp.einsum("btd,dv->btv", x, w), vocab)


def _fwd(x, w, targets, weights, z_loss, vocab):
    x, w, targets, weights = x.value, w.value, targets.value, weights.value
    nll, z, dx, dw = _loss_and_grads(x, w, targets, weights, z_loss, vocab)
    return (nll + z_loss * z, nll, z), (dx, dw.astype(w.dtype))


def _bwd(z_loss, vocab, grads, cotangents):
    g, g_nll, g_z = cotangents
    if not (isinstance(g_nll, SymbolicZero) and isinstance(g_z, SymbolicZero)):
        raise NotImplementedError("linear_cross_entropy differentiates its first output only")
    dx, dw = grads
    if isinstance(g, SymbolicZero):
        return jnp.zeros_like(dx), jnp.zeros_like(dw), None, None
    return (dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), None, None)


linear_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)
