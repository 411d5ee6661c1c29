"""Raw text -> ArrayRecord shards of documents, split into train and validation.

A prepared dataset is a directory:

    summary.json                    what went in, what was skipped, what each split holds
    train-00000.array_record ...    one record per document, its UTF-8 bytes
    validation-00000.array_record

Inputs are files or directories (searched recursively, sorted, hidden entries skipped):

- `.jsonl`: one JSON object per line, the document under `text_field`;
- `.parquet`: the `text_field` column, one document per row;
- anything else that matches `text_suffixes` (default `.txt`): one document per file.

A document goes to validation when the first 8 bytes of the SHA-256 of its text, read as a
fraction of 2**64, fall below `validation_fraction`: the split depends on the text alone, not
on file order or machine, and exact duplicates always land in the same split.

Bad documents are counted by reason and skipped (invalid UTF-8, empty, a line that is not
JSON, a missing text field, an unreadable file); only an input with nothing usable is an error.
The directory is written under a temporary name and renamed at the end, so a crash never
leaves a half-prepared dataset that looks complete.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from grain.sources import ArrayRecordDataSource
from tqdm import tqdm

from maxgpt.config import ConfigError
from maxgpt.storage import PathLike, as_path, one_line, staging_dir, upload_tree

SPLITS = ("train", "validation")
SUMMARY = "summary.json"
STRUCTURED_SUFFIXES = (".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024


def is_validation(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def find_inputs(paths: Sequence[str | Path], text_suffixes: Sequence[str]) -> list[Path]:
    """The files to read, in a fixed order; a missing path is an error."""
    wanted = {s.lower() for s in (*text_suffixes, *STRUCTURED_SUFFIXES)}
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in wanted
                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        else:
            raise ConfigError(f"input not found: {path}")
    return files


class _Reader:
    """Yields the documents of input files, counting what it has to skip and why."""

    def __init__(self, text_field: str):
        self.text_field = text_field
        self.skipped: collections.Counter[str] = collections.Counter()

    def _accept(self, text: object) -> str | None:
        if not isinstance(text, str):
            self.skipped["missing_field" if text is None else "not_text"] += 1
            return None
        if not text.strip():
            self.skipped["empty"] += 1
            return None
        return text

    def _decode(self, data: bytes) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped["invalid_utf8"] += 1
            return None

    def documents(self, path: Path) -> Iterator[str]:
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from self._jsonl(path)
            elif suffix == ".parquet":
                yield from self._parquet(path)
            else:
                text = self._decode(path.read_bytes())
                if text is not None and (text := self._accept(text)) is not None:
                    yield text
        except OSError:
            self.skipped["unreadable_file"] += 1

    def _jsonl(self, path: Path) -> Iterator[str]:
        with path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                raw = self._decode(line)
                if raw is None:
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    self.skipped["invalid_json"] += 1
                    continue
                value = record.get(self.text_field) if isinstance(record, dict) else None
                if (text := self._accept(value)) is not None:
                    yield text

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq  # a heavy import, needed only here

        try:
            table = pq.ParquetFile(path)
        except Exception:  # pyarrow raises several types for files that are not parquet
            self.skipped["unreadable_file"] += 1
            return
        if self.text_field not in table.schema_arrow.names:
            self.skipped["missing_field"] += table.metadata.num_rows
            return
        batches = table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception:  # a corrupt row group: count the file as unreadable from here
                self.skipped["unreadable_file"] += 1
                return
            for value in batch.column(0).to_pylist():
                if isinstance(value, bytes):
                    value = self._decode(value)
                    if value is None:
                        continue
                if (text := self._accept(value)) is not None:
                    yield text


class _ShardWriter:
    """ArrayRecord shards of one split, a new shard every `shard_bytes`."""

    def __init__(self, directory: Path, split: str, shard_bytes: int):
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.shards: list[str] = []
        self.documents = self.bytes = self._in_shard = 0
        self._writer = None

    def write(self, data: bytes) -> None:
        if self._writer is None or self._in_shard >= self.shard_bytes:
            self.close()
            name = f"{self.split}-{len(self.shards):05d}.array_record"
            # group_size:1 makes every record its own chunk: cheap random access by index.
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append(name)
            self._in_shard = 0
        self._writer.write(data)
        self.documents += 1
        self.bytes += len(data)
        self._in_shard += len(data)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def prepare(inputs: Sequence[str | Path], out: PathLike, *, text_field: str = "text",
            text_suffixes: Sequence[str] = (".txt",), validation_fraction: float = 0.01,
            shard_bytes: int = 128 * 2**20, progress: bool = True) -> dict:
    """Write the prepared dataset to `out` (a local directory or a URI) and return its
    summary. It is built locally; a remote `out` gets it uploaded, summary.json last, so
    that a dataset whose summary exists is whole."""
    out = as_path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new output "
                          "directory (nothing was changed)")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    files = find_inputs(inputs, text_suffixes)
    if not files:
        raise ConfigError(f"no input files ({', '.join((*text_suffixes, *STRUCTURED_SUFFIXES))})"
                          f" under {', '.join(map(str, inputs))}")
    # unique: processes (on several hosts of a shared filesystem) may race to prepare it
    tmp, remote = staging_dir(out)
    tmp.mkdir(parents=True, exist_ok=True)
    reader = _Reader(text_field)
    writers = {split: _ShardWriter(tmp, split, shard_bytes) for split in SPLITS}
    total = sum(f.stat().st_size for f in files)
    # disable=None: a bar on a terminal, nothing in logs and pipes
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", leave=False,
              disable=None if progress else True) as bar:
        for path in files:
            for text in reader.documents(path):
                split = "validation" if is_validation(text, validation_fraction) else "train"
                writers[split].write(text.encode())
            bar.update(path.stat().st_size)
    for writer in writers.values():
        writer.close()
    summary = {
        "inputs": [str(p) for p in inputs], "files": len(files), "text_field": text_field,
        "validation_fraction": validation_fraction,
        "splits": {s: {"documents": w.documents, "bytes": w.bytes, "shards": w.shards}
                   for s, w in writers.items()},
        "skipped": dict(sorted(reader.skipped.items())),
    }
    if writers["train"].documents == 0:
        shutil.rmtree(tmp)
        raise ConfigError(f"no usable training documents in {', '.join(map(str, inputs))} "
                          f"(skipped: {summary['skipped'] or 'nothing'})")
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if remote:
        try:
            upload_tree(tmp, out, last=SUMMARY)
        finally:
            shutil.rmtree(tmp)
        return summary
    if out.exists():
        out.rmdir()  # checked empty above
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(tmp)
        raise FileExistsError(out) from None
    return summary


def read_summary(directory: PathLike) -> dict:
    """The summary of a prepared dataset; a clear error for anything else."""
    path = as_path(directory) / SUMMARY
    if not as_path(directory).is_dir():
        raise ConfigError(f"dataset directory not found: {directory}")
    if not path.is_file():
        raise ConfigError(f"{directory} is not a prepared dataset (no {SUMMARY}); "
                          "run `maxgpt prepare` on your text first")
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is damaged (not JSON); prepare the dataset again") from None
    splits = summary.get("splits") if isinstance(summary, dict) else None
    if not isinstance(splits, dict) or not all(
            isinstance(splits.get(s), dict) and isinstance(splits[s].get("shards"), list)
            and all(isinstance(name, str) for name in splits[s]["shards"]) for s in SPLITS):
        raise ConfigError(f"{path} is damaged (no list of shards for each of "
                          f"{' and '.join(SPLITS)}); prepare the dataset again")
    return summary


def _damaged(shard: str, what: str) -> ConfigError:
    return ConfigError(f"{shard} is {what}; prepare the dataset again (`maxgpt prepare`)")


def _records(shard: str) -> int:
    """The record count of one shard; the user's error naming it if it cannot be opened
    (missing, empty, or not ArrayRecord)."""
    path = as_path(shard)
    if not path.is_file():
        raise _damaged(shard, f"missing (the dataset's {SUMMARY} lists it)")
    if path.stat().length == 0:  # an etils StatResult, local or remote
        raise _damaged(shard, "empty (0 bytes)")
    reader = ArrayRecordReader(shard)
    count = reader.num_records() if reader.ok() else None
    try:
        reader.close()  # raises what went wrong on opening
    except RuntimeError as e:
        if one_line(e).startswith("open()"):  # the operating system's reason
            raise _damaged(shard, f"unreadable ({one_line(e)})") from None
        count = None  # array_record's own text misleads: "at least 64KB" for any short file
    if count is None:
        raise _damaged(shard, "damaged: not a readable ArrayRecord file")
    return count


class _Shards(ArrayRecordDataSource):
    """grain's ArrayRecord source whose read errors (damage inside a shard, which opening it
    does not reveal) are the user's error naming the shard, not riegeli's traceback."""

    def __init__(self, shards: list[str]):
        super().__init__(shards)  # opens every shard to count its records
        self.shards = shards

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except RuntimeError as e:
            raise self._damage(int(key), e) from None

    def __getitems__(self, keys):
        try:
            return super().__getitems__(keys)
        except RuntimeError:
            return [self[key] for key in keys]  # the one that fails names its shard

    def _damage(self, key: int, error: RuntimeError) -> ConfigError:
        for shard in self.shards:  # the error path only: count records again to find it
            count = _records(shard)
            if key < count:
                return _damaged(shard, f"damaged at record {key} ({one_line(error)})")
            key -= count
        return ConfigError(f"a shard of {os.path.dirname(self.shards[0])} is damaged "
                           f"({one_line(error)}); prepare the dataset again")


def document_source(directory: PathLike, split: str) -> ArrayRecordDataSource:
    """Random access to the documents (UTF-8 bytes) of one split of a prepared dataset,
    local or remote (array_record reads gs:// itself). A missing, empty or damaged shard is
    the user's error naming it, on opening or (damage inside a shard) on reading."""
    directory = as_path(directory)
    shards = [os.fspath(directory / shard)
              for shard in read_summary(directory)["splits"][split]["shards"]]
    if not shards:
        hint = (" (prepare it with --validation-fraction above 0, or set train.eval_every=0)"
                if split == "validation" else "")
        raise ConfigError(f"{directory} has no {split} documents{hint}")
    try:
        return _Shards(shards)
    except (RuntimeError, ValueError, OSError) as e:
        for shard in shards:  # which one, and why: only when opening failed
            _records(shard)
        raise ConfigError(f"cannot open the {split} shards of {directory} ({one_line(e)})"
                          ) from None


def sample_documents(directory: PathLike, split: str = "train", seed: int = 0) -> Iterator[str]:
    """A split's documents in a seeded random order, read lazily (a tokenizer's training
    sample should not be the alphabetically first files)."""
    source = document_source(directory, split)
    for index in np.random.default_rng(seed).permutation(len(source)):
        yield source[int(index)].decode()
