"""Text generation with a KV cache: `maxgpt generate` and the sample that ends a training run.

- Prompts of different lengths are batched by left padding: row b's tokens end at the same
  slot, its padding slots hold position -1 and are never attended to.
- Prefill runs the model once over all prompt tokens, writing their keys and values into
  the cache (`Transformer.decode`); each decode step then feeds one token per row. Prefill
  and the whole decode loop (`lax.while_loop`, ending when every row has met eos) are one
  jitted call, the cache updated in place inside it: no host round trip per token. The
  cache is sharded like the activations (batch over the data axes, kv heads over tensor).
- Sampling: temperature (0 is greedy), top-k, top-p (nucleus), from a key derived from
  (seed, step), so a seed reproduces a completion. A row stops at eos.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxgpt.config import ConfigError, ModelConfig
from maxgpt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from maxgpt.sharding import constrain


def init_cache(cfg: ModelConfig, batch: int, length: int, kind: str = "model") -> dict:
    """An empty KV cache: keys and values in the compute dtype (`model`), or `int8` with a
    float32 scale per token and head (a quarter of float32's bytes, plus 1/head_dim)."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.int8 if kind == "int8" else cfg.dtype
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "positions": jnp.full((batch, length), -1, jnp.int32),
             "start": jnp.zeros((), jnp.int32)}
    if kind == "int8":
        cache.update(k_scale=jnp.ones((*shape[:-1], 1), jnp.float32),
                     v_scale=jnp.ones((*shape[:-1], 1), jnp.float32))
    return cache


def choose(logits, key, *, temperature: float, top_k: int, top_p: float, allow_eos):
    """Next tokens (B,) from last-position logits (B, V). `allow_eos` may be traced."""
    logits = jnp.where(allow_eos, logits, logits.at[:, EOS_ID].set(-jnp.inf))
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:  # a k of the whole vocabulary or more cuts nothing
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest set reaching top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int = 0) -> None:
    """The user's error for sampling settings that mean nothing (named as `maxgpt generate`'s
    flags): checked before a checkpoint is read, and again by `generate`."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no top-k cut), got {top_k}")
    if not 0 < top_p <= 1:  # also false for nan
        raise ConfigError(f"--top-p must be in (0, 1] (1: no nucleus cut), got {top_p}")
    if not 0 <= seed < 2**63:  # what jax.random.key takes
        raise ConfigError(f"--seed must be in [0, 2**63), got {seed}")


def generate(graphdef: nnx.GraphDef, params, cfg: ModelConfig, prompts: list[list[int]], *,
             max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, min_new_tokens: int = 0,
             prompt_slots: int = 0, kv_cache: str = "model") -> list[list[int]]:
    """Continue each prompt (token ids, bos included) by up to `max_new_tokens`; a row stops
    at eos (never before `min_new_tokens`). Returns the new ids of each row, eos excluded.
    Prompts are left-padded to at least `prompt_slots` slots, so that calls with prompts of
    other lengths share one compiled shape (maxgpt/scoring.py). `kv_cache`: `model` or `int8`
    (init_cache)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    B, P = len(prompts), max(prompt_slots, *(len(p) for p in prompts))
    length = P + max_new_tokens
    if cfg.position == "learned" and length > cfg.max_seq_len:
        raise ConfigError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                          f"model.max_seq_len={cfg.max_seq_len}")
    tokens = np.full((B, P), PAD_ID, np.int32)
    positions = np.full((B, P), -1, np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, P - len(prompt):] = prompt
        positions[b, P - len(prompt):] = np.arange(len(prompt))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    new = _run(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
               init_cache(cfg, B, length, kv_cache), jax.random.key(seed), max_new_tokens,
               min_new_tokens, tuple(sampling.items()))
    rows = []
    for row in np.asarray(new):
        end = np.flatnonzero(row < 0)  # -1 from a row's eos on
        rows.append([int(t) for t in row[:end[0] if len(end) else len(row)]])
    return rows


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _run(graphdef, params, tokens, positions, cache, key, max_new: int, min_new: int,
         sampling: tuple):
    """Prefill, then the whole decode loop on the device (`lax.while_loop`): no host round
    trip per token. Returns (B, max_new) new ids, -1 after a row's eos."""
    model = nnx.merge(graphdef, params)
    options = dict(sampling)
    logits, cache = model.decode(tokens, positions, cache)
    B = tokens.shape[0]

    def body(carry):
        t, logits, cache, position, out, done = carry
        token = choose(logits, jax.random.fold_in(key, t), allow_eos=t >= min_new, **options)
        done = done | (token == EOS_ID)
        out = out.at[:, t].set(jnp.where(done, -1, token))
        logits, cache = model.decode(token[:, None], position, cache)
        return t + 1, logits[:, -1], cache, position + 1, out, done

    def cond(carry):
        t, *_, done = carry
        return (t < max_new) & ~jnp.all(done)

    carry = (jnp.zeros((), jnp.int32), logits[:, -1], cache, positions[:, -1:] + 1,
             jnp.full((B, max_new), -1, jnp.int32), jnp.zeros((B,), bool))
    # replicated: every process reads every row (rows sharded over several processes'
    # devices could not be fetched by any one of them)
    return constrain(jax.lax.while_loop(cond, body, carry)[4], (None, None))


SAMPLE_TOKENS = 160


def print_sample(graphdef: nnx.GraphDef, params, cfg: ModelConfig, tokenizer, seed: int) -> None:
    """A few lines generated from bos, which ends every training run on text: what the model
    has learned, at a glance. Every process samples (the parameters span them all; the draw
    is seeded, so they agree) and process 0 prints."""
    ids = generate(graphdef, params, cfg, [[BOS_ID]],
                   max_new_tokens=min(SAMPLE_TOKENS, cfg.max_seq_len - 1), temperature=0.8,
                   top_k=50, seed=seed, min_new_tokens=SAMPLE_TOKENS // 2)[0]
    if jax.process_index() == 0:
        print(f"--- sample: {len(ids)} tokens from bos, temperature 0.8, top-k 50 ---\n"
              f"{tokenizer.decode(ids)}\n---", flush=True)
