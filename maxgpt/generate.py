"""Text generation with a KV cache: `maxgpt generate` and the sample that ends a training run.

- Prompts of different lengths are batched by left padding: row b's tokens end at the same
  slot, its padding slots hold position -1 and are never attended to.
- Prefill runs the model once over all prompt tokens, writing their keys and values into
  the cache (`Transformer.decode`); each decode step then feeds one token per row. Both are
  jitted (two shapes, two compilations), and the cache is sharded like the activations
  (batch over the data axes, kv heads over tensor).
- Sampling: temperature (0 is greedy), top-k, top-p (nucleus), from a key derived from
  (seed, step), so a seed reproduces a completion. A row stops at eos.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxgpt.config import ConfigError, ModelConfig
from maxgpt.data.tokenizer import EOS_ID, PAD_ID


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype),
            "positions": jnp.full((batch, length), -1, jnp.int32),
            "start": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "allow_eos"))
def choose(logits, key, *, temperature: float, top_k: int, top_p: float, allow_eos: bool):
    """Next tokens (B,) from last-position logits (B, V)."""
    if not allow_eos:
        logits = logits.at[:, EOS_ID].set(-jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest set reaching top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(graphdef: nnx.GraphDef, params, cfg: ModelConfig, prompts: list[list[int]], *,
             max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Continue each prompt (token ids, bos included) by up to `max_new_tokens`; a row stops
    at eos (never before `min_new_tokens`). Returns the new ids of each row, eos excluded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    length = P + max_new_tokens
    if cfg.position == "learned" and length > cfg.max_seq_len:
        raise ConfigError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                          f"model.max_seq_len={cfg.max_seq_len}")
    tokens = np.full((B, P), PAD_ID, np.int32)
    positions = np.full((B, P), -1, np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, P - len(prompt):] = prompt
        positions[b, P - len(prompt):] = np.arange(len(prompt))

    @jax.jit
    def step(params, tokens, positions, cache):
        logits, cache = nnx.merge(graphdef, params).decode(tokens, positions, cache)
        return logits[:, -1], cache

    logits, cache = step(params, tokens, positions, init_cache(cfg, B, length))
    next_positions = positions[:, -1:] + 1
    key = jax.random.key(seed)
    new: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        chosen = np.asarray(choose(logits, jax.random.fold_in(key, t), temperature=temperature,
                                   top_k=top_k, top_p=top_p, allow_eos=t >= min_new_tokens))
        for b in np.flatnonzero(~done):
            if chosen[b] == EOS_ID:
                done[b] = True
            else:
                new[b].append(int(chosen[b]))
        if done.all() or t == max_new_tokens - 1:
            break
        logits, cache = step(params, chosen[:, None], next_positions, cache)
        next_positions = next_positions + 1
    return new
