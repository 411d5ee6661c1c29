"""The sentencepiece tokenizer: training on a corpus sample, and the wrapper the pipeline uses.

Choices, and why:

- identity normalisation, no extra-whitespace removal and no dummy prefix: source code keeps
  every space, tab and newline, so `decode(encode(text)) == text` byte for byte;
- byte fallback: any byte the vocabulary lacks becomes one `<0xNN>` piece, never `<unk>`;
- split digits: numbers are read digit by digit (Llama, PaLM), which helps arithmetic and
  keeps numerals from eating the vocabulary;
- fixed special ids, pad 0, unk 1, bos 2, eos 3: pad 0 matches segment id 0 = padding.
"""

from __future__ import annotations

import functools
import hashlib
import io
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from maxgpt.config import ConfigError
from maxgpt.storage import PathLike, as_path, one_line, write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB = 256 + 4 + 4  # byte pieces, the specials, and at least a few merges
# sentencepiece skips training sentences longer than its max_sentence_length, so documents are
# fed as chunks of whole lines up to this many characters (newlines stay inside the chunks).
TRAIN_CHUNK_CHARS = 4000


class Tokenizer:
    """A sentencepiece model held as bytes: cheap to pickle into grain worker processes."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits of the model file's SHA-256: equal tokenizers, equal fingerprints."""
        return hashlib.sha256(self.model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        path = as_path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise ConfigError(f"{path} is not a sentencepiece model") from None

    def __getstate__(self):
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def encode_document(self, text: str) -> np.ndarray:
        """`bos text eos` as int32: a document's tokens as the model sees them."""
        return np.asarray([BOS_ID, *self._sp.encode(text), EOS_ID], np.int32)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for bos/eos/pad): for bits per byte.

        A byte-fallback piece is one byte; `▁` is sentencepiece's spelling of a space.
        """
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            piece = self._sp.id_to_piece(i)
            lengths[i] = 1 if self._sp.is_byte(i) else len(piece.replace("▁", " ").encode())
        return lengths


def _line_chunks(doc: str) -> Iterator[str]:
    """A document cut at line ends into pieces of at most TRAIN_CHUNK_CHARS."""
    chunk = ""
    for line in doc.splitlines(keepends=True):
        if chunk and len(chunk) + len(line) > TRAIN_CHUNK_CHARS:
            yield chunk
            chunk = ""
        chunk += line[:TRAIN_CHUNK_CHARS]
    if chunk:
        yield chunk


def _sample(documents: Iterable[str], sample_bytes: int, progress: bool) -> Iterator[str]:
    """Training sentences from whole documents, until `sample_bytes` were given."""
    given = 0
    # disable=None: a bar on a terminal, nothing in logs and pipes
    with tqdm(total=sample_bytes, unit="B", unit_scale=True, desc="tokenizer sample",
              leave=False, disable=None if progress else True) as bar:
        for doc in documents:
            for chunk in _line_chunks(doc):
                yield chunk
                given += len(chunk.encode())
                bar.update(len(chunk.encode()))
            if given >= sample_bytes:
                return


def train_tokenizer(documents: Iterable[str], out: PathLike, vocab_size: int,
                    model_type: str = "bpe", sample_bytes: int = 32_000_000,
                    threads: int = 2, progress: bool = True) -> Tokenizer:
    """Train on the first `sample_bytes` of `documents` (give them shuffled) and write `out`.

    Deterministic: the same documents give the same model file.
    """
    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer model type must be bpe or unigram, got {model_type!r}")
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"tokenizer vocab size must be at least {MIN_VOCAB}, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sample(documents, sample_bytes, progress), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            max_sentence_length=4 * TRAIN_CHUNK_CHARS, character_coverage=0.9999,
            input_sentence_size=0, num_threads=threads, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high": the sample is too small
        # The first line: when sentencepiece's input raised, later lines are a stack dump
        message = one_line(e)
        raise ConfigError(f"sentencepiece could not train a {vocab_size}-piece {model_type} "
                          f"tokenizer on this sample: {message}") from None
    out = as_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, model.getvalue())  # processes may race: never a half-written file
    return Tokenizer(model.getvalue())
