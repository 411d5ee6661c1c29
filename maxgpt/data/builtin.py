"""The built-in corpus: the Python standard library's source, as shipped with this interpreter.

Nothing to download, real text with long-range structure, and on every machine that runs
maxgpt. The corpus is every `*.py` file under `sysconfig`'s stdlib directory, minus
`site-packages`/`dist-packages` (third-party code) and `__pycache__`; test files are kept
(they are code too). docs/data.md gives its size for the Pythons we test on.

On first use it is prepared (`maxgpt.data.prepare`) into the cache, and a tokenizer of the
requested size is trained on it and cached beside it; later runs reuse both. The cache key
is the interpreter's version and stdlib path, so a different Python gets its own corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

from maxgpt.data.prepare import SUMMARY, prepare, sample_documents
from maxgpt.data.tokenizer import train_tokenizer

VALIDATION_FRACTION = 0.02  # ~36 files: a small corpus needs a larger share to evaluate on
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def cache_root() -> Path:
    """`$MAXGPT_CACHE`, else `$XDG_CACHE_HOME/maxgpt`, else `~/.cache/maxgpt`."""
    if os.environ.get("MAXGPT_CACHE"):
        return Path(os.environ["MAXGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maxgpt"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))


def corpus_dir() -> Path:
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(f"{sys.version}|{stdlib}".encode()).hexdigest()[:10]
    return cache_root() / f"builtin-python{platform.python_version()}-{key}"


@contextlib.contextmanager
def _exclusive(target: Path):
    """Hold a lock file beside `target`: processes of one job that share a cache (several
    processes on a host, or hosts on a shared file system) build it once, in turn."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(text: str, progress: bool) -> None:
    """A start-up line on stderr: building these takes seconds, and once only."""
    if progress:
        print(text, file=sys.stderr, flush=True)


def prepared_corpus(progress: bool = True) -> Path:
    """The prepared stdlib corpus, preparing it on first use (a few seconds)."""
    directory = corpus_dir()
    if not (directory / SUMMARY).is_file():
        with _exclusive(directory):
            if not (directory / SUMMARY).is_file():  # not built while we waited
                _say(f"maxgpt: preparing the built-in corpus (this Python's standard library) "
                     f"in {directory}, once", progress)
                prepare(stdlib_files(), directory, text_suffixes=(".py",),
                        validation_fraction=VALIDATION_FRACTION, progress=progress)
    return directory


def tokenizer_path(vocab_size: int) -> Path:
    """The cached BPE tokenizer for the built-in corpus, trained on first use (~10 s)."""
    directory = prepared_corpus()
    path = directory / f"tokenizer-bpe-{vocab_size}.model"
    if not path.is_file():
        with _exclusive(path):
            if not path.is_file():
                _say(f"maxgpt: training a {vocab_size}-piece BPE tokenizer on the built-in "
                     f"corpus, once (4 s for 512 pieces, 5-10 s for 8192 on 2 cores)", True)
                train_tokenizer(sample_documents(directory), path, vocab_size)
    return path
