"""The grain pipeline: prepared documents -> tokens -> packed rows -> per-process batches.

Per source (a prepared dataset directory), as a grain `MapDataset`:

    ArrayRecord documents -> global shuffle (seed) -> this process's share [p::P]
        -> repeat (reshuffled every epoch) -> tokenise (bos text eos)

then a weighted mixture of the sources, tokenisation in `data.num_workers` processes
(`mp_prefetch`, which keeps the order of the single-process pipeline), packing, a shuffle
of the packed rows in windows (training only), batching and a prefetch thread, as
`IterDataset`s.

Packing is concat-then-split (grain's `ConcatThenSplitIterDataset`) over (input, target)
pairs: each document of n tokens gives n-1 pairs, `inputs = doc[:-1], targets = doc[1:]`,
which are laid end to end and cut into rows of `seq_len`. Each piece of a document in a row
is its own segment (ids 1, 2, ... in the row) with positions restarting at 0, so attention
never crosses a document boundary and every prediction of the epoch appears exactly once
(none lost to truncation, none duplicated). A long document simply continues in the next
row, with a fresh context there. Rows are full: the only padding (segment 0) is in the last
row of a finite pass (evaluation); training streams are endless and carry no padding.

The whole iterator, packing buffer and prefetch included, has a JSON state
(`get_state`/`set_state`) that is saved with every checkpoint: a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import grain
from absl import flags
import numpy as np
from grain.experimental import (ConcatThenSplitIterDataset, ThreadPrefetchIterDataset,
                                WindowShuffleIterDataset)

from maxgpt.config import Config, ConfigError
from maxgpt.data import builtin
from maxgpt.data.prepare import document_source, read_summary
from maxgpt.data.tokenizer import MIN_VOCAB, Tokenizer

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids")
# Packed rows are shuffled in windows of this many before batching: a long document fills
# many consecutive rows, and a batch cut from one document gives a noisy, correlated
# gradient. 512 rows mix dozens of documents into every batch at the cost of holding
# 512 * seq_len * 16 bytes (2 MiB at 256, 32 MiB at 4096) and re-reading one window on resume.
ROW_SHUFFLE_WINDOW = 512
TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What a run reads: prepared datasets with mixture weights, and one tokenizer."""

    sources: tuple[tuple[Path, float], ...]
    tokenizer_path: Path
    tokenizer: Tokenizer


def _source_dir(name: str) -> Path:
    if name == "builtin":
        return builtin.prepared_corpus()
    read_summary(name)  # a clear error if it is not a prepared dataset
    return Path(name)


def _default_tokenizer(name: str, directory: Path, cfg: Config) -> Path:
    if name == "builtin":
        return builtin.tokenizer_path(cfg.model.vocab_size)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {TOKENIZER_FILE}; train one with `maxgpt "
                          f"tokenizer train --data {directory}` or set data.tokenizer=PATH")
    return path


def resolve_corpus(cfg: Config, tokenizer: Path | None = None) -> Corpus | None:
    """The datasets and tokenizer `cfg.data` names (None for synthetic data), checked.

    `tokenizer`, when given, wins over `data.tokenizer` (a run directory's own copy).
    """
    d = cfg.data
    if d.source == "synthetic":
        return None
    named = list(d.sources.items()) if d.source == "mixture" else [(d.source, 1.0)]
    if tokenizer is None and not d.tokenizer and named[0][0] == "builtin" and (
            cfg.model.vocab_size < MIN_VOCAB):
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is too small for the built-in corpus's "
            f"tokenizer (256 byte pieces + 4 specials + merges need {MIN_VOCAB}); use 512 or "
            "more, or data.source=synthetic")
    sources = tuple((_source_dir(str(name)), float(w)) for name, w in named)
    if tokenizer is not None:
        path = tokenizer
    elif d.tokenizer:
        path = Path(d.tokenizer)
    else:
        path = _default_tokenizer(str(named[0][0]), sources[0][0], cfg)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {path} has {tokenizer.vocab_size} pieces but the model only "
            f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size or use a "
            "smaller tokenizer")
    return Corpus(sources, path, tokenizer)


def describe(corpus: Corpus | None) -> str:
    if corpus is None:
        return "synthetic"
    names = ", ".join(f"{d} (weight {w:g})" if len(corpus.sources) > 1 else str(d)
                      for d, w in corpus.sources)
    return f"{names}, tokenizer {corpus.tokenizer.vocab_size} pieces"


class _TokenizeDocument(grain.transforms.Map):
    """UTF-8 document -> its (input, target) pairs. Runs in the worker processes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        tokens = self.tokenizer.encode_document(record.decode())
        return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": packed["inputs"], "targets": packed["targets"],
            "positions": packed["inputs_positions"],
            "segment_ids": packed["inputs_segment_ids"]}


DOCUMENT_SHUFFLE, ROW_SHUFFLE = 1, 2


def _seed(seed: int, *purpose: int) -> int:
    """A 32-bit seed for one shuffle of the run (each source's documents, the rows)."""
    return int(np.random.SeedSequence([seed, *purpose]).generate_state(1)[0])


def _documents(directory: Path, split: str, tokenizer: Tokenizer, seed: int | None,
               process: tuple[int, int], repeat: bool) -> grain.MapDataset:
    index, count = process
    ds = grain.MapDataset.source(document_source(directory, split))
    if seed is not None:
        ds = ds.shuffle(seed)
    ds = ds[index::count]
    if len(ds) == 0:
        raise ConfigError(f"{directory} has too few {split} documents to give each of "
                          f"{count} processes a share")
    if repeat:
        ds = ds.repeat()
    return ds.map(_TokenizeDocument(tokenizer))


def packed_rows(corpus: Corpus, split: str, *, seq_len: int, seed: int | None,
                process: tuple[int, int] = (0, 1), num_workers: int = 0) -> grain.IterDataset:
    """Rows of `seq_len` (input, target) pairs, documents laid end to end, in stream order.

    `seed` None reads the split once, in order (evaluation); an int shuffles the documents
    with it and repeats forever (training).
    """
    repeat = seed is not None
    per_source = [
        _documents(d, split, corpus.tokenizer,
                   None if seed is None else _seed(seed, DOCUMENT_SHUFFLE, i), process, repeat)
        for i, (d, _) in enumerate(corpus.sources)]
    docs = (per_source[0] if len(per_source) == 1 else
            grain.MapDataset.mix(per_source, [w for _, w in corpus.sources]))
    ds = docs.to_iter_dataset()
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library has no main()
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    ds = ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return ds.map(_to_row)


def _tuple_slices(state: Any) -> Any:
    """Undo what JSON does to grain's packer state: its "no remainder" sentinel is the tuple
    (-1, -1), compared with ==, and a JSON round trip turns it into a list that no longer
    matches (the restored packer then replays a bogus remainder). grain 0.2.18."""
    if isinstance(state, dict):
        return {k: ({f: tuple(x) for f, x in v.items()} if k == "remainder_slices" else
                    _tuple_slices(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_tuple_slices(x) for x in state]
    return state


class Batches:
    """The training/eval iterator: grain's, with a JSON-safe `set_state`."""

    def __init__(self, dataset: grain.IterDataset):
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(_tuple_slices(state))

    def close(self) -> None:
        self._it.close()


def batches(corpus: Corpus, split: str, *, seq_len: int, batch_size: int, seed: int | None,
            process: tuple[int, int] = (0, 1), num_workers: int = 0,
            prefetch: int = 0) -> Batches:
    """Per-process batches of `batch_size` packed rows; with a seed (training) the rows are
    shuffled in windows of ROW_SHUFFLE_WINDOW first."""
    ds = packed_rows(corpus, split, seq_len=seq_len, seed=seed, process=process,
                     num_workers=num_workers)
    if seed is not None:
        ds = WindowShuffleIterDataset(ds, window_size=ROW_SHUFFLE_WINDOW,
                                      seed=_seed(seed, ROW_SHUFFLE))
    ds = ds.batch(batch_size, drop_remainder=False)
    if prefetch:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return Batches(ds)


def check_eval_split(corpus: Corpus, seq_len: int, process: tuple[int, int]) -> None:
    """Raise now, not at the first evaluation, if a source has no validation share here."""
    packed_rows(corpus, "validation", seq_len=seq_len, seed=None, process=process)


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A short final batch grown to `rows` with padding rows (segment id 0: no loss)."""
    missing = rows - batch["inputs"].shape[0]
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


def eval_batches(corpus: Corpus, cfg: Config, process: tuple[int, int]
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The first `train.eval_steps` validation batches, the same ones every time; once the
    split is exhausted, padding batches (so every process runs the same number of steps)."""
    local = cfg.train.batch_size // process[1]
    it = batches(corpus, "validation", seq_len=cfg.train.seq_len, batch_size=local,
                 seed=None, process=process)
    empty = {k: np.zeros((local, cfg.train.seq_len), np.int32) for k in BATCH_KEYS}
    for _ in range(cfg.train.eval_steps):
        batch = next(it, None)
        yield empty if batch is None else pad_rows(batch, local)
