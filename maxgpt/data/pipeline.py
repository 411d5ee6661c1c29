"""The grain pipeline: prepared documents -> tokens -> packed rows -> batches, in streams.

The data of a run is `data.streams` independent streams, a number fixed when the run starts
(by default, the number of distinct row shares of its first mesh). Each global batch of B
rows is the streams' batches of B/S rows laid end to end: stream s gives rows
[s*B/S, (s+1)*B/S). A process reads only the streams its devices' rows fall in and keeps
those rows (`StreamReader`). So the batches depend on (seed, streams) alone, never on how
many processes read them or how the mesh lays rows out, and a checkpoint (one state per
stream) resumes on any process count.

Per source (a prepared dataset directory) and stream s of S, as a grain `MapDataset`:

    ArrayRecord documents -> global shuffle (seed) -> the stream's share [s::S]
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

Each stream's iterator, packing buffer and prefetch included, has a JSON state
(`get_state`/`set_state`) that is saved with every checkpoint: a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import grain
from absl import flags
import numpy as np
from etils import epath
from grain.experimental import (ConcatThenSplitIterDataset, ThreadPrefetchIterDataset,
                                WindowShuffleIterDataset)

from maxgpt.config import Config, ConfigError
from maxgpt.data import builtin
from maxgpt.data.prepare import document_source, read_summary
from maxgpt.data.tokenizer import MIN_VOCAB, Tokenizer
from maxgpt.storage import as_path

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

    sources: tuple[tuple[epath.Path, float], ...]  # local paths or URIs (gs://...)
    tokenizer_path: epath.Path
    tokenizer: Tokenizer


def _source_dir(name: str) -> epath.Path:
    if name == "builtin":
        return as_path(builtin.prepared_corpus())
    read_summary(name)  # a clear error if it is not a prepared dataset
    return as_path(name)


def _default_tokenizer(name: str, directory: epath.Path, cfg: Config) -> epath.Path:
    if name == "builtin":
        return as_path(builtin.tokenizer_path(cfg.model.vocab_size))
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {TOKENIZER_FILE}; train one with `maxgpt "
                          f"tokenizer train --data {directory}` or set data.tokenizer=PATH")
    return path


def resolve_corpus(cfg: Config, tokenizer: epath.Path | None = None) -> Corpus | None:
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
        path = as_path(d.tokenizer)
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


def _documents(directory: epath.Path, split: str, tokenizer: Tokenizer, seed: int | None,
               stream: tuple[int, int], repeat: bool) -> grain.MapDataset:
    index, count = stream
    ds = grain.MapDataset.source(document_source(directory, split))
    if seed is not None:
        ds = ds.shuffle(seed)
    ds = ds[index::count]
    if len(ds) == 0:
        raise ConfigError(f"{directory} has too few {split} documents to give each of "
                          f"data.streams={count} streams a share; lower data.streams")
    if repeat:
        ds = ds.repeat()
    return ds.map(_TokenizeDocument(tokenizer))


def packed_rows(corpus: Corpus, split: str, *, seq_len: int, seed: int | None,
                stream: tuple[int, int] = (0, 1), num_workers: int = 0) -> grain.IterDataset:
    """Rows of `seq_len` (input, target) pairs of stream (index, count), documents laid end
    to end.

    `seed` None reads the split once, in order (evaluation); an int shuffles the documents
    with it and repeats forever (training).
    """
    repeat = seed is not None
    per_source = [
        _documents(d, split, corpus.tokenizer,
                   None if seed is None else _seed(seed, DOCUMENT_SHUFFLE, i), stream, repeat)
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
            stream: tuple[int, int] = (0, 1), num_workers: int = 0,
            prefetch: int = 0) -> Batches:
    """One stream's batches of `batch_size` packed rows; with a seed (training) the rows are
    shuffled in windows of ROW_SHUFFLE_WINDOW first."""
    ds = packed_rows(corpus, split, seq_len=seq_len, seed=seed, stream=stream,
                     num_workers=num_workers)
    if seed is not None:
        ds = WindowShuffleIterDataset(ds, window_size=ROW_SHUFFLE_WINDOW,
                                      seed=_seed(seed, ROW_SHUFFLE))
    ds = ds.batch(batch_size, drop_remainder=False)
    if prefetch:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return Batches(ds)


def stream_rows(rows: Sequence[int], batch_size: int, streams: int) -> dict[int, np.ndarray]:
    """{stream: positions within its batch of B/S rows} for the global batch `rows` a process
    feeds, in the order of `rows` (ascending)."""
    per = batch_size // streams
    needed: dict[int, list[int]] = {}
    for row in rows:
        needed.setdefault(row // per, []).append(row % per)
    return {s: np.asarray(pos) for s, pos in needed.items()}


class StreamReader:
    """A process's rows of every global batch (ascending global row order), read from the
    streams they fall in. `open_stream(s)` gives stream s's iterator of B/S-row batches.

    The state holds one entry per stream read here, {"streams": {"s": state}}; `set_state`
    takes a dict that may hold more (the union over all processes of a run, as a checkpoint
    restores it).
    """

    def __init__(self, open_stream: Callable[[int], Any], rows: Sequence[int],
                 batch_size: int, streams: int):
        self.positions = stream_rows(rows, batch_size, streams)
        self.streams = {s: open_stream(s) for s in self.positions}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [{k: v[positions] for k, v in next(self.streams[s]).items()}
                 for s, positions in self.positions.items()]
        return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

    def get_state(self) -> dict:
        return {"streams": {str(s): it.get_state() for s, it in self.streams.items()}}

    def set_state(self, state: dict) -> None:
        saved = state.get("streams", {})
        missing = sorted(s for s in self.streams if str(s) not in saved)
        if missing:
            raise ConfigError(f"the saved data position has no state for stream(s) {missing} "
                              f"(it holds {sorted(map(int, saved))})")
        for s, it in self.streams.items():
            it.set_state(saved[str(s)])

    def close(self) -> None:
        for it in self.streams.values():
            it.close()


def check_eval_split(corpus: Corpus, seq_len: int, streams: int) -> None:
    """Raise now, not at the first evaluation, if a source has no validation documents for
    some stream."""
    for s in range(streams):
        packed_rows(corpus, "validation", seq_len=seq_len, seed=None, stream=(s, streams))


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A short final batch grown to `rows` with padding rows (segment id 0: no loss)."""
    missing = rows - batch["inputs"].shape[0]
    return batch if missing == 0 else {k: np.pad(v, ((0, missing), (0, 0)))
                                       for k, v in batch.items()}


def eval_batches(corpus: Corpus, cfg: Config, rows: Sequence[int], streams: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """This process's `rows` of the first `train.eval_steps` validation batches, the same
    ones every time; once a stream is exhausted, padding rows (so every process takes the
    same number of steps)."""
    per, seq_len = cfg.train.batch_size // streams, cfg.train.seq_len

    def padded(s: int) -> Iterator[dict[str, np.ndarray]]:
        with contextlib.closing(batches(corpus, "validation", seq_len=seq_len,
                                        batch_size=per, seed=None, stream=(s, streams))) as it:
            yield from (pad_rows(batch, per) for batch in it)
        while True:
            yield {k: np.zeros((per, seq_len), np.int32) for k in BATCH_KEYS}

    with contextlib.closing(StreamReader(padded, rows, cfg.train.batch_size, streams)) as reader:
        for _ in range(cfg.train.eval_steps):
            yield next(reader)
