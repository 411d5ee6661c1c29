"""The optimizer: warmup then cosine/linear decay, AdamW with a weight-decay mask, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from maxgpt.config import Config

NO_DECAY_SUFFIXES = ("scale", "bias")  # norm scales and every *_bias parameter


def learning_rate(cfg: Config):
    """step -> lr. Linear warmup reaches the peak at step warmup_steps - 1 (never 0 at the
    first step), then decays to lr * min_lr_ratio at the last step."""
    o, steps = cfg.optim, cfg.train.steps
    peak, floor = o.lr, o.lr * o.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(o.warmup_steps, 1)
        progress = jnp.clip((step - o.warmup_steps) / max(steps - 1 - o.warmup_steps, 1), 0, 1)
        if o.decay == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif o.decay == "linear":
            decayed = peak - (peak - floor) * progress
        else:
            decayed = jnp.full_like(progress, peak)
        return jnp.where(step < o.warmup_steps, warm, decayed)

    return schedule


def decay_mask(params):
    """True for parameters that get weight decay: matrices and embeddings, not norms/biases."""
    def one(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not name.endswith(NO_DECAY_SUFFIXES)
    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(learning_rate(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=decay_mask)
    if o.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return adamw
