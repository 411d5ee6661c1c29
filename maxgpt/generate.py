"""Sampling text from a trained model.

Plain autoregressive sampling: every new token re-runs the model over a fixed (1, T)
buffer (one compiled shape, no cache). That is cheap for the short samples a training run
ends with; KV-cache decoding for long generations is tracked in the export/generate issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxgpt.data.tokenizer import EOS_ID


def sample(graphdef: nnx.GraphDef, params, prompt: list[int], *, max_new_tokens: int,
           seq_len: int, temperature: float = 0.8, top_k: int = 50, seed: int = 0,
           min_new_tokens: int = 0) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens`, stopping at eos (never
    before `min_new_tokens`) or at `seq_len`. Returns the new ids. temperature 0 is greedy."""

    @jax.jit
    def next_logits(params, tokens, index):
        logits = nnx.merge(graphdef, params)(tokens)  # (1, T, V)
        return jax.lax.dynamic_index_in_dim(logits[0], index, keepdims=False)  # (V,)

    rng = np.random.default_rng(seed)
    buffer = np.zeros((1, seq_len), np.int32)
    buffer[0, :len(prompt)] = prompt
    new: list[int] = []
    for position in range(len(prompt), min(len(prompt) + max_new_tokens, seq_len)):
        logits = np.asarray(next_logits(params, jnp.asarray(buffer), position - 1), np.float64)
        if len(new) < min_new_tokens:
            logits[EOS_ID] = -np.inf
        if temperature == 0:
            token = int(logits.argmax())
        else:
            top = np.argpartition(logits, -top_k)[-top_k:]
            p = np.exp((logits[top] - logits[top].max()) / temperature)
            token = int(rng.choice(top, p=p / p.sum()))
        if token == EOS_ID:
            break
        buffer[0, position] = token
        new.append(token)
    return new
