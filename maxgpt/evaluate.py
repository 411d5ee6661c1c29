"""Held-out evaluation: loss, perplexity and bits per byte on the validation split.

The same function serves `maxgpt eval --run-dir DIR` and the evaluation every
`train.eval_every` steps. It reads the first `train.eval_steps` validation batches, in
order and unshuffled, so every evaluation of a run scores the same tokens.

Bits per byte = summed negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the target
tokens: unlike perplexity it does not depend on the tokenizer, so runs with different
vocabularies compare. bos/eos targets carry loss but no bytes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from maxgpt.data.pipeline import Corpus, eval_batches


def evaluate(trainer, params: Any, corpus: Corpus, byte_lengths: np.ndarray) -> dict[str, float]:
    """Sums over `train.eval_steps` batches; `byte_lengths[id]` = UTF-8 bytes of token id."""
    nll = tokens = n_bytes = 0.0
    for local in eval_batches(corpus, trainer.cfg, trainer.batch_rows, trainer.streams):
        local = dict(local, target_bytes=byte_lengths[local["targets"]].astype(np.int32))
        sums = jax.device_get(trainer.eval_fn(params, trainer.global_batch(local)))
        nll, tokens, n_bytes = nll + float(sums[0]), tokens + float(sums[1]), n_bytes + float(
            sums[2])
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_bpb": nll / math.log(2) / max(n_bytes, 1.0), "eval_tokens": int(tokens)}
