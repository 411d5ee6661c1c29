"""The data pipeline: preparing, tokenising, packing, sharding, iterator state, bad input."""

import contextlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maxgpt import cli
from maxgpt.config import ConfigError
from maxgpt.data import builtin
from maxgpt.data.pipeline import (BATCH_KEYS, ROW_SHUFFLE_WINDOW, Corpus, StreamReader,
                                  _documents, batches, packed_rows, resolve_corpus)
from maxgpt.data.prepare import document_source, is_validation, prepare, sample_documents
from maxgpt.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer
from tests.conftest import REPO, make_config

SEQ = 32
WORDS = ("def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y",
         "value", "=", "(", ")", ":", "\n", "    ", "0", "42", "é", "λ", "\t")


def make_document(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words)) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """40 text files of 1 to 300 words (many longer than a row), prepared, with a
    320-piece tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir()
    for i in range(40):
        (raw / f"doc{i:02d}.txt").write_text(make_document(rng, int(rng.integers(1, 300))))
    prepare([raw], root / "prepared", validation_fraction=0.2, progress=False)
    tokenizer = train_tokenizer(sample_documents(root / "prepared"),
                                root / "prepared/tokenizer.model", vocab_size=320)
    return Corpus(((root / "prepared", 1.0),), root / "prepared/tokenizer.model", tokenizer)


def split_documents(corpus: Corpus, split: str) -> list[str]:
    source = document_source(corpus.sources[0][0], split)
    return [source[i].decode() for i in range(len(source))]


def epoch_pairs(corpus: Corpus, docs: list[str]) -> int:
    return sum(len(corpus.tokenizer.encode_document(d)) - 1 for d in docs)


def stream(row_iter, pairs: int) -> tuple[list[dict], np.ndarray]:
    """Packed rows until `pairs` predictions were read; and the inputs of those, in order."""
    rows, taken = [], 0
    while taken < pairs:
        rows.append(next(row_iter))
        taken += int((rows[-1]["segment_ids"] > 0).sum())
    inputs = np.concatenate([row["inputs"][row["segment_ids"] > 0] for row in rows])
    return rows, inputs[:pairs]


def rows_of(corpus, seed, **kwargs):
    return iter(packed_rows(corpus, "train", seq_len=SEQ, seed=seed, **kwargs))


def split_at_bos(inputs: np.ndarray) -> list[tuple[int, ...]]:
    starts = np.flatnonzero(inputs == BOS_ID)
    return [tuple(x) for x in np.split(inputs, starts[1:])]


def test_packing_loses_and_duplicates_nothing_within_an_epoch(corpus):
    docs = split_documents(corpus, "train")
    rows, inputs = stream(rows_of(corpus, 7), epoch_pairs(corpus, docs))
    # Every document starts with bos and bos appears nowhere else, so cutting the packed
    # stream at bos gives back the epoch's documents: each exactly once.
    expected = sorted(tuple(corpus.tokenizer.encode_document(d)[:-1]) for d in docs)
    assert sorted(split_at_bos(inputs)) == expected
    assert len(rows) * SEQ - len(inputs) < SEQ  # full rows: padding-free while streaming


def test_segments_never_cross_documents(corpus):
    it = iter(batches(corpus, "train", seq_len=SEQ, batch_size=4, seed=7))  # rows shuffled
    for _ in range(30):
        batch = next(it)
        for r in range(4):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            inputs, targets = batch["inputs"][r], batch["targets"][r]
            for s in np.unique(seg[seg > 0]):
                span = np.flatnonzero(seg == s)
                assert np.array_equal(span, np.arange(span[0], span[-1] + 1))  # contiguous
                np.testing.assert_array_equal(pos[span], np.arange(len(span)))
                assert BOS_ID not in inputs[span[1:]]  # a second document never starts inside
                assert EOS_ID not in targets[span[:-1]]  # nor does one end before the segment
                np.testing.assert_array_equal(targets[span[:-1]], inputs[span[1:]])


def test_shuffle_is_deterministic_in_the_seed(corpus):
    def first(seed):
        it = batches(corpus, "train", seq_len=SEQ, batch_size=4, seed=seed)
        return np.stack([next(it)["inputs"] for _ in range(5)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


def test_epochs_are_reshuffled_and_complete(corpus):
    docs = split_documents(corpus, "train")
    pairs = epoch_pairs(corpus, docs)
    _, two_epochs = stream(rows_of(corpus, 1), 2 * pairs)
    first, second = split_at_bos(two_epochs[:pairs]), split_at_bos(two_epochs[pairs:])
    assert sorted(first) == sorted(second)
    assert first != second  # epoch 2 in a new order


def test_batches_are_the_packed_rows_shuffled_within_windows(corpus):
    window = ROW_SHUFFLE_WINDOW
    rows = rows_of(corpus, 4)
    packed = [tuple(next(rows)["inputs"]) for _ in range(2 * window)]
    it = batches(corpus, "train", seq_len=SEQ, batch_size=8, seed=4)
    batched = [tuple(row) for _ in range(2 * window // 8) for row in next(it)["inputs"]]
    for w in range(2):  # each window is a permutation of the same window of packed rows
        part = slice(w * window, (w + 1) * window)
        assert sorted(batched[part]) == sorted(packed[part])
    assert batched[:window] != packed[:window]


def test_streams_read_disjoint_shares_that_cover_everything(corpus):
    directory = corpus.sources[0][0]
    shares = [[tuple(d["inputs"]) for d in _documents(directory, "train", corpus.tokenizer,
                                                      5, (p, 2), repeat=False)]
              for p in range(2)]
    everything = sorted(tuple(corpus.tokenizer.encode_document(d)[:-1])
                        for d in split_documents(corpus, "train"))
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == everything
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    # and the packed batches of the two streams differ
    a = next(batches(corpus, "train", seq_len=SEQ, batch_size=2, seed=5, stream=(0, 2)))
    b = next(batches(corpus, "train", seq_len=SEQ, batch_size=2, seed=5, stream=(1, 2)))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_any_rows_of_a_global_batch_come_from_the_streams_they_fall_in(corpus):
    """Global batch = the streams' batches end to end, whatever rows a process reads (also
    rows of several streams, not contiguous); a state saved by readers of some rows
    restores readers of other rows."""
    def stream(s):
        return batches(corpus, "train", seq_len=SEQ, batch_size=2, seed=5, stream=(s, 3))

    def reader(rows):
        return StreamReader(stream, rows, batch_size=6, streams=3)

    plain = [stream(s) for s in range(3)]
    expected = [{k: np.concatenate([b[k] for b in step]) for k in BATCH_KEYS}
                for step in zip(*[[next(it) for _ in range(4)] for it in plain])]
    for rows in [range(6), (1, 2, 5), (3,)]:
        with contextlib.closing(reader(rows)) as it:
            for want in expected:
                got = next(it)
                for key in BATCH_KEYS:
                    np.testing.assert_array_equal(got[key], want[key][list(rows)])

    # Two "processes" (rows 0-2 and 3-5) save after 2 steps; their merged state resumes a
    # reader of rows 1 and 4 at step 3.
    states = []
    for rows in [(0, 1, 2), (3, 4, 5)]:
        with contextlib.closing(reader(rows)) as it:
            next(it), next(it)
            states.append(json.loads(json.dumps(it.get_state())))
    merged = {"streams": {**states[0]["streams"], **states[1]["streams"]}}
    with contextlib.closing(reader((1, 4))) as it:
        it.set_state(merged)
        for want in expected[2:]:
            np.testing.assert_array_equal(next(it)["inputs"], want["inputs"][[1, 4]])
    with contextlib.closing(reader((5,))) as it, pytest.raises(ConfigError, match=r"\[2\]"):
        it.set_state(states[0])  # rows 0-2 never read stream 2


@pytest.mark.parametrize("workers, prefetch, before", [
    (0, 0, 7), (0, 2, 7), (2, 2, 7),  # mid-window, a document split across the boundary
    (0, 2, ROW_SHUFFLE_WINDOW // 4), (0, 0, ROW_SHUFFLE_WINDOW // 4 + 3)])  # window edges
def test_restored_iterator_continues_with_identical_batches(corpus, workers, prefetch, before):
    def make():
        return iter(batches(corpus, "train", seq_len=SEQ, batch_size=4, seed=2,
                            num_workers=workers, prefetch=prefetch))

    it = make()
    for _ in range(before):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(6)]
    it.close()
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    restored.close()


def test_worker_processes_do_not_change_the_batches(corpus):
    def first(workers):
        it = iter(batches(corpus, "train", seq_len=SEQ, batch_size=4, seed=9,
                          num_workers=workers))
        out = np.stack([next(it)["inputs"] for _ in range(6)])
        it.close()
        return out

    np.testing.assert_array_equal(first(0), first(2))


def test_mixture_follows_the_weights(corpus, tmp_path):
    rng = np.random.default_rng(1)
    other = tmp_path / "other"
    other.mkdir()
    with (other / "docs.jsonl").open("w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": "import x\n" + make_document(rng, 5)}) + "\n")
    prepare([other], tmp_path / "other-prepared", validation_fraction=0.0, progress=False)
    mixed = Corpus((corpus.sources[0], (tmp_path / "other-prepared", 3.0)),
                   corpus.tokenizer_path, corpus.tokenizer)
    _, inputs = stream(iter(packed_rows(mixed, "train", seq_len=SEQ, seed=0)), 6000)
    docs = split_at_bos(inputs)[:-1]
    marker = tuple(corpus.tokenizer.encode("import x\n"))
    from_other = sum(d[1:1 + len(marker)] == marker for d in docs)
    assert from_other / len(docs) == pytest.approx(0.75, abs=0.08)


def test_tokenizer_round_trips_source_code_byte_for_byte():
    tok = Tokenizer.load(builtin.tokenizer_path(512))
    lengths = tok.byte_lengths()
    texts = [p.read_text() for p in builtin.stdlib_files()[:200:10]] + [
        "\tdef f(x):  \r\n\t\treturn x  # trailing  \n", "  leading spaces\n\n\n", "", " ",
        "naïve café λx: x → ∞ 🐍\n", "x = 1_000_000 + 0xFF\n", "a\x00b\x7f\x1b[0m"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode())  # bits per byte counts right
    ids = tok.encode_document("x")
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and lengths[[BOS_ID, EOS_ID]].sum() == 0


def test_tokenizer_training_is_deterministic(corpus, tmp_path):
    a = train_tokenizer(sample_documents(corpus.sources[0][0]), tmp_path / "a.model", 320)
    b = train_tokenizer(sample_documents(corpus.sources[0][0]), tmp_path / "b.model", 320)
    assert a.model_proto == b.model_proto


def test_prepare_reads_all_formats_and_counts_bad_input(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.txt").write_text("hello world\n")
    (raw / "sub/b.txt").write_text("   \n")  # empty
    (raw / "bad.txt").write_bytes(b"caf\xe9\n")  # latin-1, not UTF-8
    (raw / ".hidden.txt").write_text("never read\n")
    (raw / "ignored.md").write_text("not a listed suffix\n")
    (raw / "c.jsonl").write_bytes(b'{"body": "one"}\n{"body": ""}\nnot json\n{"other": 1}\n'
                                  b'\n{"body": "two"}\n{"body": "\xff"}\n')
    pq.write_table(pa.table({"body": ["three", None, "four"]}), raw / "d.parquet")
    summary = prepare([raw], tmp_path / "out", text_field="body", validation_fraction=0.0,
                      progress=False)
    assert summary["files"] == 5 and summary["splits"]["train"]["documents"] == 5
    docs = split_documents(Corpus(((tmp_path / "out", 1.0),), None, None), "train")
    assert sorted(docs) == sorted(["hello world\n", "one", "two", "three", "four"])
    assert summary["skipped"] == {"empty": 2, "invalid_json": 1, "invalid_utf8": 2,
                                  "missing_field": 2}


def test_validation_split_is_by_document_hash(corpus):
    train = split_documents(corpus, "train")
    validation = split_documents(corpus, "validation")
    assert validation and not set(train) & set(validation)
    assert all(is_validation(d, 0.2) for d in validation)
    assert not any(is_validation(d, 0.2) for d in train)


def test_builtin_corpus_is_the_standard_library():
    directory = builtin.prepared_corpus()
    summary = json.loads((directory / "summary.json").read_text())
    files = builtin.stdlib_files()
    assert summary["files"] == len(files) > 500
    assert any(p.name == "functools.py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    usable = summary["splits"]["train"]["documents"] + summary["splits"]["validation"]["documents"]
    assert usable == len(files) - sum(summary["skipped"].values())


# ---- bad input: one line, exit code 2, nothing lost ------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_prepare_errors(tmp_path, capsys):
    code, err = run_cli(capsys, "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and "input not found" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/a.txt").write_text("\n\n")
    (tmp_path / "empty/b.txt").write_bytes(b"\xff\xfe")
    code, err = run_cli(capsys, "prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no usable training documents" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep").write_text("mine")
    code, err = run_cli(capsys, "prepare", str(tmp_path / "empty"), "--out",
                        str(tmp_path / "taken"))
    assert code == 2 and (tmp_path / "taken/keep").read_text() == "mine"


def test_train_data_errors(corpus, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r1"),
                        f"data.source={tmp_path / 'missing'}")
    assert code == 2 and "dataset directory not found" in err
    code, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r2"),
                        f"data.source={tmp_path}")
    assert code == 2 and "not a prepared dataset" in err
    with pytest.raises(ConfigError, match="has 320 pieces but the model only"):
        resolve_corpus(make_config("tiny", f"data.source={corpus.sources[0][0]}",
                                   "model.vocab_size=256"))
    code, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r3"),
                        "--config", f"{REPO}/configs/experiments/smoke.yaml", "train.seq_len=4096")
    assert code == 2 and "exceeds model.max_seq_len" in err
    code, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r4"), "data.source=mixture")
    assert code == 2 and "data.sources" in err
    no_validation = tmp_path / "no-validation"
    prepare([corpus.sources[0][0] / "summary.json"], no_validation, text_suffixes=(".json",),
            validation_fraction=0.0, progress=False)
    code, err = run_cli(capsys, "train", "--run-dir", str(tmp_path / "r5"),
                        f"data.source={no_validation}", f"data.tokenizer={corpus.tokenizer_path}",
                        "--config", f"{REPO}/configs/experiments/smoke.yaml")
    assert code == 2 and "has no validation documents" in err  # before any training
    assert not any((tmp_path / r).exists() for r in ("r3", "r4"))  # config errors: no files
    for r in ("r1", "r2", "r5"):  # data errors: nothing but the shared-storage probe
        assert os.listdir(tmp_path / r) == [".maxgpt-probes"]
        assert not os.listdir(tmp_path / r / ".maxgpt-probes")


def test_mixture_weights_from_the_command_line(corpus):
    cfg = make_config("tiny", "data.source=mixture",
                      f"data.sources={{{corpus.sources[0][0]}: 2, builtin: 1}}",
                      "model.vocab_size=512", f"data.tokenizer={corpus.tokenizer_path}")
    resolved = resolve_corpus(cfg)
    assert [w for _, w in resolved.sources] == [2.0, 1.0]
    assert resolved.sources[1][0] == builtin.corpus_dir()


def test_tokenizer_command_trains_bpe_and_unigram(corpus, tmp_path, capsys):
    docs = split_documents(corpus, "train")
    for kind in ("bpe", "unigram"):
        out = tmp_path / f"{kind}.model"
        code, _ = run_cli(capsys, "tokenizer", "train", "--data", str(corpus.sources[0][0]),
                          "--vocab-size", "300", "--model-type", kind, "--out", str(out))
        assert code == 0
        tok = Tokenizer.load(out)
        assert tok.vocab_size == 300
        assert all(tok.decode(tok.encode(d)) == d for d in docs)
    code, err = run_cli(capsys, "tokenizer", "train", "--data", str(corpus.sources[0][0]),
                        "--out", str(tmp_path / "bpe.model"))
    assert code == 2 and "already exists" in err  # never overwrites a tokenizer
