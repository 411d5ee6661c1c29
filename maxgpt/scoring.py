"""Scoring token sequences with the sharded model: log-likelihoods and greedy checks of
continuations, and generation, in fixed-shape batches on every process of a job.

What lm-evaluation-harness tasks need of a model (maxgpt/harness.py), in token terms:

- `loglikelihood(sequences, counts)`: for each sequence (at most `train.seq_len` + 1
  tokens, fed as inputs `seq[:-1]` predicting `seq[1:]`), the summed log-probability of its
  last `count` tokens and whether greedy decoding would have produced all of them;
- `generate(prompts, max_new_tokens, ...)`: continuations from the KV-cache decoder
  (maxgpt/generate.py).

Batches are `eval.batch_size` rows (rounded up to a multiple of the data shards), sharded
like training batches, each padded to one of a few lengths (`train.seq_len`, halved down to
BUCKET_MIN), so XLA compiles a handful of shapes, never one per request. Padding rows and
positions carry segment id 0 and weight 0. Requests are sorted by length, longest first,
so each batch pads little.

Multi-process: process 0 calls these methods (it drives the harness); every other process
calls `serve()`, which receives each batch from process 0 (a broadcast of a small header,
then the token arrays) and runs the same jitted computation, until process 0's `close()`.
Every process thus calls each jitted function with the same global batch, as a
multi-controller JAX program must. With one process nothing is broadcast.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxgpt import distributed, sharding
from maxgpt.config import ConfigError
from maxgpt.data.tokenizer import BOS_ID, PAD_ID
from maxgpt.generate import generate
from maxgpt.loss import chunk_size

BUCKET_MIN = 64  # shortest padded length: below it a shape more saves nothing worth a compile
_STOP, _SCORE, _GENERATE = 0, 1, 2
_HEADER = 8  # int32 slots: op, rows, length, max_new, top_k, seed, failed, unused


def bucket_lengths(seq_len: int) -> list[int]:
    """The padded lengths batches take: seq_len, halved while even and >= BUCKET_MIN."""
    lengths = [seq_len]
    while lengths[-1] % 2 == 0 and lengths[-1] // 2 >= BUCKET_MIN:
        lengths.append(lengths[-1] // 2)
    return sorted(lengths)


def _row_scores(logits_fn, hidden, targets, weights, chunk: int):
    """Per row (B,): summed log-probability of the weighted targets, and whether each is
    the argmax; `chunk` positions of logits at a time (maxgpt/loss.py's reason)."""
    def piece(h, t, w):
        logits = logits_fn(h)  # (B, c, V) fp32
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        logp = picked - jax.nn.logsumexp(logits, axis=-1)
        greedy = (jnp.argmax(logits, axis=-1) == t) | (w == 0)
        return (logp * w).sum(-1), jnp.all(greedy, axis=-1)

    B, T = targets.shape
    if chunk >= T:
        return piece(hidden, targets, weights)

    def split(a):  # (B, T, ...) -> (T / chunk, B, chunk, ...)
        return a.reshape(B, T // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)

    def add(total, pieces):
        logp, greedy = piece(*pieces)
        return (total[0] + logp, total[1] & greedy), None

    start = (jnp.zeros((B,), jnp.float32), jnp.ones((B,), bool))
    return jax.lax.scan(add, start, (split(hidden), split(targets), split(weights)))[0]


def _score_step(params, batch, *, graphdef, loss_chunk: int):
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    output = model.output_weights()
    T = batch["targets"].shape[1]
    logp, greedy = _row_scores(lambda h: model.logits(h, output), hidden, batch["targets"],
                               batch["weights"].astype(jnp.float32), chunk_size(loss_chunk, T))
    return logp, greedy.astype(jnp.int32)


def score_batch(tokens: np.ndarray, lengths: np.ndarray, counts: np.ndarray
                ) -> dict[str, np.ndarray]:
    """The model's batch for rows `tokens[b, :lengths[b]]` (B, T + 1) whose last `counts[b]`
    tokens are scored: inputs/targets/positions/segment_ids/weights, each (B, T)."""
    B, T = tokens.shape[0], tokens.shape[1] - 1
    slot = np.arange(T)[None, :]
    real = slot < (lengths[:, None] - 1)  # input slots holding a token
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(slot, (B, T)).astype(np.int32),
            "segment_ids": real.astype(np.int32),
            "weights": (real & (slot >= lengths[:, None] - 1 - counts[:, None])).astype(
                np.int32)}


class Scorer:
    """The model of a run, its parameters and its mesh, scoring batches of requests."""

    def __init__(self, trainer, params, batch_size: int, seed: int = 0,
                 kv_cache: str = "model"):
        """`params`: the train state's (trainer.natural_params puts them in depth order);
        `kv_cache`: generate's cache kind (model | int8)."""
        cfg = trainer.cfg
        self.kv_cache = kv_cache
        self.trainer, self.model_cfg = trainer, cfg.model
        self.params = trainer.natural_params(params)
        self.seq_len = cfg.train.seq_len
        shards = sharding.data_shards(trainer.mesh)
        self.rows = -(-batch_size // shards) * shards  # a multiple of the data shards
        self.local_rows = np.asarray(sharding.batch_rows(trainer.batch_sharding, self.rows))
        self.lengths = bucket_lengths(self.seq_len)
        self.seed, self.calls = seed, 0
        self.multi = distributed.process_count() > 1
        self._score = jax.jit(
            functools.partial(_score_step, graphdef=trainer.graphdef,
                              loss_chunk=cfg.train.loss_chunk),
            in_shardings=(trainer.param_shardings, trainer.batch_sharding),
            out_shardings=sharding.replicated(trainer.mesh))

    def _bucket(self, n: int, cap: int | None = None) -> int:
        cap = self.seq_len if cap is None else cap
        return min([b for b in self.lengths if b >= n] + [cap])

    # -- process 0 -------------------------------------------------------------------------

    def _send(self, header: Sequence[int], arrays: dict[str, np.ndarray] | None = None
              ) -> None:
        """The header, then the arrays, to every other process (waiting in `serve`)."""
        if not self.multi:
            return
        from jax.experimental import multihost_utils

        row = np.zeros(_HEADER, np.int32)
        row[:len(header)] = header
        multihost_utils.broadcast_one_to_all(row)
        if arrays is not None:
            multihost_utils.broadcast_one_to_all(arrays)

    def loglikelihood(self, sequences: list[list[int]], counts: list[int]
                      ) -> list[tuple[float, bool]]:
        """(log p of the last `count` tokens, all greedy) per sequence, in order."""
        for seq, k in zip(sequences, counts):
            if not 1 <= k < len(seq) <= self.seq_len + 1:
                raise ValueError(f"a scored sequence has {len(seq)} tokens and {k} to score; "
                                 f"it needs 1 <= k < length <= {self.seq_len + 1}")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        for start in range(0, len(order), self.rows):
            chosen = order[start:start + self.rows]
            T = self._bucket(len(sequences[chosen[0]]) - 1)
            tokens = np.full((self.rows, T + 1), PAD_ID, np.int32)
            lengths = np.full(self.rows, 2, np.int32)  # padding rows: 2 slots, nothing scored
            counts_ = np.zeros(self.rows, np.int32)
            for b, i in enumerate(chosen):
                tokens[b, :len(sequences[i])] = sequences[i]
                lengths[b], counts_[b] = len(sequences[i]), counts[i]
            arrays = {"tokens": tokens, "lengths": lengths, "counts": counts_}
            self._send([_SCORE, self.rows, T + 1], arrays)
            logp, greedy = self._run_score(arrays)
            for b, i in enumerate(chosen):
                out[i] = (float(logp[b]), bool(greedy[b]))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
        """New token ids for each prompt (cut from the left to fit `train.seq_len` with the
        new tokens), eos excluded; at most `max_new_tokens` (at most seq_len - 1) each."""
        max_new = max(1, min(max_new_tokens, self.seq_len - 1))
        room = self.seq_len - max_new
        prompts = [p[-room:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.rows):
            chosen = order[start:start + self.rows]
            P = self._bucket(len(prompts[chosen[0]]), room)
            tokens = np.full((self.rows, P), BOS_ID, np.int32)
            lengths = np.ones(self.rows, np.int32)  # padding rows: a bos
            for b, i in enumerate(chosen):
                tokens[b, P - len(prompts[i]):] = prompts[i]
                lengths[b] = len(prompts[i])
            arrays = {"tokens": tokens, "lengths": lengths,
                      "sampling": np.asarray([temperature, top_p], np.float32)}
            seed = (self.seed + self.calls) % 2**31  # an int32 in the header
            self.calls += 1
            self._send([_GENERATE, self.rows, P, max_new, top_k, seed], arrays)
            new = self._run_generate(arrays, max_new, top_k, seed)
            for b, i in enumerate(chosen):
                out[i] = new[b]
        return out

    def close(self, failed: bool = False) -> None:
        """Release the other processes from `serve()` (process 0, once, always)."""
        self._send([_STOP, 0, 0, 0, 0, 0, int(failed)])

    # -- every process ---------------------------------------------------------------------

    def serve(self) -> None:
        """The other processes' side: compute what process 0 sends, until it stops."""
        from jax.experimental import multihost_utils

        while True:
            header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.int32))
            op, rows, length, max_new, top_k, seed, failed = (int(x) for x in header[:7])
            if op == _STOP:
                if failed:
                    raise ConfigError("process 0 failed while scoring lm-eval tasks (its "
                                      "error says why)")
                return
            template = {"tokens": np.zeros((rows, length), np.int32),
                        "lengths": np.zeros(rows, np.int32)}
            if op == _SCORE:
                template["counts"] = np.zeros(rows, np.int32)
                self._run_score(multihost_utils.broadcast_one_to_all(template))
            else:
                template["sampling"] = np.zeros(2, np.float32)
                self._run_generate(multihost_utils.broadcast_one_to_all(template), max_new,
                                   top_k, seed)

    def _run_score(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = score_batch(arrays["tokens"], arrays["lengths"], arrays["counts"])
        local = {k: np.ascontiguousarray(v[self.local_rows]) for k, v in batch.items()}
        with jax.set_mesh(self.trainer.mesh):
            logp, greedy = self._score(self.params, sharding.global_batch(
                local, self.trainer.batch_sharding, self.rows))
        return np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(greedy))

    def _run_generate(self, arrays: dict[str, np.ndarray], max_new: int, top_k: int,
                      seed: int) -> list[list[int]]:
        tokens, lengths = arrays["tokens"], arrays["lengths"]
        P = tokens.shape[1]
        prompts = [list(row[P - n:]) for row, n in zip(tokens, lengths)]
        temperature, top_p = (float(x) for x in arrays["sampling"])
        with jax.set_mesh(self.trainer.mesh):
            return generate(self.trainer.graphdef, self.params, self.model_cfg, prompts,
                            max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, prompt_slots=P, kv_cache=self.kv_cache)
