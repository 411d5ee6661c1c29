"""Synthetic batches: deterministic, learnable, free. For tests, benchmarks and smoke runs.

Row r of step s is an arithmetic progression modulo the vocabulary, `(a + d * i) mod V`, with
start a and stride d in [1, 16] drawn from (seed, s, r) alone. A model must look at two
previous tokens to predict the next one, so the loss falls from ln(V) towards 0 as it learns
(an induction task), and any process can build any row without talking to the others.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_STRIDE = 16


class SyntheticSource:
    """An endless, checkpointable iterator of some rows (default: all) of every global
    batch, step after step."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int,
                 rows: Sequence[int] | None = None):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.own_rows = tuple(range(batch_size)) if rows is None else tuple(rows)
        self.step = 0

    def rows(self, step: int, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """`rows` of the global batch of `step`, as numpy arrays."""
        seqs = np.empty((len(rows), self.seq_len + 1), np.int64)
        for i, row in enumerate(rows):
            rng = np.random.default_rng([self.seed, step, row])
            a, d = rng.integers(self.vocab_size), rng.integers(1, MAX_STRIDE + 1)
            seqs[i] = (a + d * np.arange(self.seq_len + 1)) % self.vocab_size
        n = len(rows)
        return {
            "inputs": seqs[:, :-1].astype(np.int32),
            "targets": seqs[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                         (n, self.seq_len)).copy(),
            "segment_ids": np.ones((n, self.seq_len), np.int32),
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.rows(self.step, self.own_rows)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass
