"""Paths are URIs: every path a user gives may be a local path or `gs://bucket/...`.

All of maxgpt reaches storage through `etils.epath` (orbax's own path library), which reads
`gs://` through gcsfs (the `[gcs]` extra). Two rules follow from object storage:

- a URI is never made absolute or resolved (`Path("gs://b/x")` is `gs:/b/x` to pathlib, and
  `.absolute()` puts the working directory in front of it);
- objects cannot be appended to or renamed in place (gcsfs turns append into overwrite and
  rename into copy + delete), but an object write is atomic: it appears whole or not at all.
  `write_atomic` is the one way a file that others may be reading is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Union

from etils import epath

from maxgpt.config import ConfigError

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(path: PathLike) -> bool:
    """True for a URI with a scheme (gs://, s3://, ...), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """The epath for what a user gave; a gs:// URI needs gcsfs installed."""
    text = os.fspath(path)
    if text.startswith("gs://"):
        try:
            import fsspec
            import gcsfs  # noqa: F401  (epath's backend for gs://)
        except ImportError:
            raise ConfigError(f"{text}: gs:// paths need gcsfs; pip install 'maxgpt[gcs]'"
                              ) from None
        # gcsfs caches directory listings forever by default, so a process would never see
        # what another host wrote into a folder it listed once (new checkpoints, probes).
        fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    return epath.Path(text)


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute (orbax and tensorstore want that); a URI as it is."""
    path = as_path(path)
    return path if is_remote(path) else epath.Path(os.path.abspath(path))


def write_atomic(path: PathLike, data: bytes) -> None:
    """Replace `path` so that a reader sees the old or the new content, never a part: an
    object write on object storage, a write to a temporary name and a rename locally."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    tmp.replace(path)


def upload_tree(local: Path, target: epath.Path, last: str = "") -> None:
    """Copy a local directory's files to `target`, the file named `last` after all others
    (the one that marks the copy complete)."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for file in sorted(files, key=lambda p: p.name == last):
        dest = target / file.relative_to(local).as_posix()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "rb") as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)


def staging_dir(target: PathLike) -> tuple[Path, bool]:
    """Where to build a directory that ends up at `target`: beside it for a local target
    (renamed into place at the end), in a local temporary directory for a remote one
    (uploaded at the end); the bool says which."""
    target = as_path(target)
    if is_remote(target):
        return Path(tempfile.mkdtemp(prefix="maxgpt-staging-")), True
    return Path(os.fspath(target.with_name(f"{target.name}.partial-{uuid.uuid4().hex}"))), False


def one_line(error: BaseException, width: int = 240) -> str:
    """An exception from a storage library as one short line (they can be pages of text):
    its first line, with the middle cut out when long (the cause, e.g. "No space left on
    device", tends to come last)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    code = re.search(r"\[os_error_code='(\d+)'\]", text)  # tensorstore's errno, at the end
    if len(text) > width:
        text = f"{text[:width // 3]} ... {text[-(width - width // 3 - 5):]}"
    if code and os.strerror(int(code.group(1))) not in text:
        text += f" ({os.strerror(int(code.group(1)))})"
    return text
