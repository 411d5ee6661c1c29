"""Checkpoint cost: how long a save blocks the training loop, and save/restore throughput
against the storage's raw speed measured in the same run, for a local scratch directory and
a gs:// one on a GCS emulator, side by side.

Method: the benchmark shape (configs/experiments/bench-cpu.yaml: params, AdamW moments and
counters of a 66M-parameter model, fp32) is initialised on one device and saved with the
same `Checkpointer` that `maxgpt train` uses, `--repeats` times per backend, the backends
interleaved (local, gs, local, gs, ...) so that the machine's swings hit both alike:

- blocking time: how long `Checkpointer.save` takes to return (orbax copies the arrays off
  the device, then writes in the background), against the median train step of the same
  shape (train_throughput.py's `time_steps`);
- save throughput: state bytes / time from the save call until the write is committed;
- restore throughput: state bytes / time of `Checkpointer.restore` into the shardings;
- local raw disk: the same number of bytes written to one file in the same directory with
  64 MiB `write` calls, once as orbax writes (no `fsync`: the data may still sit in the page
  cache when the save is committed) and once with an `fsync` at the end, then read back.
  Reads (ours and orbax's) come from the page cache when it holds the data: both see the
  same;
- stored: the bytes of the step's files (orbax compresses with zstd: the AdamW moments of
  a freshly initialised state are zeros, two thirds of the state, and take almost nothing);
- gs: a scratch folder of a bucket on fake-gcs-server (tests/emulator.py: a local process
  on 127.0.0.1, objects stored as files in a directory beside the local scratch one),
  started by this benchmark, its environment set before the first gs:// call. Its raw
  speed: the same bytes as 64 MiB objects, all sent at once through tensorstore (the client
  orbax writes arrays with), then read back. Requests: how many the emulator logged (its
  request log) while `save` blocked (an upper bound on the round trips the loop waited for:
  background writes that start before `save` returns count too), until the save was
  committed, and during the restore. Exists check: the median time of one `exists()` of a
  folder through epath and gcsfs, the directory check orbax makes, and its requests.

Medians over the repeats; for each measure also gs / local, and for the blocking time
gs - local in milliseconds. Results are recorded in docs/benchmarks.md.

    python benchmarks/checkpoint_io.py [--repeats 3] [--backends local,gs] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jax
from train_throughput import time_steps  # benchmarks/ is on sys.path when run as a script

from maxgpt import sharding
from maxgpt.checkpoint import Checkpointer
from maxgpt.config import load_config
from maxgpt.run_dir import RunDir
from maxgpt.storage import as_path
from maxgpt.train import abstract_state, build_trainer, init_state

CHUNK = 64 * 2**20
BACKENDS = ("local", "gs")
MB = 1e6


def raw_disk(directory: Path, size: int) -> tuple[float, float, float]:
    """(write, write + fsync, read) bytes/s for one file of `size` bytes."""
    path = directory / "raw.bin"
    block = os.urandom(CHUNK)
    speeds = []
    for sync in (False, True):
        start = time.perf_counter()
        with open(path, "wb") as f:
            for offset in range(0, size, CHUNK):
                f.write(block[:min(CHUNK, size - offset)])
            f.flush()
            if sync:
                os.fsync(f.fileno())
        speeds.append(size / (time.perf_counter() - start))
        if not sync:
            path.unlink()
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    read = size / (time.perf_counter() - start)
    path.unlink()
    return speeds[0], speeds[1], read


def raw_gcs(prefix: str, size: int) -> tuple[float, float]:
    """(write, read) bytes/s for `size` bytes as 64 MiB objects under `prefix`, all sent at
    once through tensorstore (the client orbax writes with), then read back."""
    import tensorstore as ts

    bucket, _, folder = prefix.removeprefix("gs://").partition("/")
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": f"{folder}/raw/"}
                         ).result()
    block = os.urandom(CHUNK)
    keys = [str(i) for i in range(0, size, CHUNK)]
    start = time.perf_counter()
    for write in [kv.write(k, block[:min(CHUNK, size - int(k))]) for k in keys]:
        write.result()
    write = size / (time.perf_counter() - start)
    start = time.perf_counter()
    got = sum(len(read.result().value) for read in [kv.read(k) for k in keys])
    read = size / (time.perf_counter() - start)
    assert got == size
    kv.delete_range(ts.KvStore.KeyRange()).result()
    return write, read


def exists_check(prefix: str, log: "RequestLog", calls: int = 20) -> tuple[float, float]:
    """(median seconds, requests) of one `exists()` of a folder through epath and gcsfs: the
    directory check orbax makes on object storage."""
    folder = as_path(prefix)
    times = []
    before = log.count()
    for _ in range(calls):
        start = time.perf_counter()
        folder.exists()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (log.count() - before) / calls


def stored_bytes(run: str) -> int:
    """Bytes of all files (objects) under the run directory `run`."""
    if run.startswith("gs://"):
        import fsspec

        return int(fsspec.filesystem("gs").du(run))
    return sum(f.stat().st_size for f in Path(run).rglob("*") if f.is_file())


class RequestLog:
    """Counts the requests the emulator has logged (one line each) so far."""

    def __init__(self, path: Path):
        self.path = path

    def count(self) -> int:
        with open(self.path, "rb") as f:
            return sum(b'HTTP/1.1\\"' in line for line in f)


def _trial(trainer, cfg, state, size: int, run: str, log: RequestLog | None) -> dict:
    """One save and restore of `state` in the run directory `run`."""
    checkpointer = Checkpointer(RunDir(run))
    count = log.count if log else (lambda: 0)
    before = count()
    start = time.perf_counter()
    checkpointer.save(1, state, {}, cfg, None)
    blocking = time.perf_counter() - start
    blocking_requests = count() - before
    checkpointer.manager.wait_until_finished()
    save = size / (time.perf_counter() - start)
    save_requests = count() - before
    before = count()
    start = time.perf_counter()
    restored, _ = checkpointer.restore(1, abstract_state(trainer), trainer.state_shardings,
                                       data=False)
    jax.block_until_ready(restored)
    restore = size / (time.perf_counter() - start)
    restore_requests = count() - before
    del restored
    checkpointer.close()
    return {"blocking": blocking, "save": save, "restore": restore, "stored": stored_bytes(run),
            "blocking_requests": blocking_requests, "save_requests": save_requests,
            "restore_requests": restore_requests}


def _summary(trials: list[dict], size: int, step_time: float) -> dict:
    med = {key: statistics.median(t[key] for t in trials) for key in trials[0]}
    results = {
        "state_mb": size / MB, "step_time_s": step_time,
        "save_blocking_s": med["blocking"],
        "save_blocking_fraction_of_step": med["blocking"] / step_time,
        "save_mb_per_s": med["save"] / MB,
        "restore_mb_per_s": med["restore"] / MB,
        "stored_mb": med["stored"] / MB,
    }
    if "disk_write" in med:
        results.update({
            "disk_write_mb_per_s": med["disk_write"] / MB,
            "disk_write_fsync_mb_per_s": med["disk_sync"] / MB,
            "disk_read_mb_per_s": med["disk_read"] / MB,
        })
        results["save_fraction_of_disk"] = (results["save_mb_per_s"]
                                            / results["disk_write_mb_per_s"])
        results["restore_fraction_of_disk"] = (results["restore_mb_per_s"]
                                               / results["disk_read_mb_per_s"])
    else:
        results.update({
            "save_blocking_requests": med["blocking_requests"],
            "save_requests": med["save_requests"],
            "restore_requests": med["restore_requests"],
            "exists_check_ms": med["exists_s"] * 1e3,
            "exists_check_requests": med["exists_requests"],
            "raw_write_mb_per_s": med["raw_write"] / MB,
            "raw_read_mb_per_s": med["raw_read"] / MB,
        })
        results["save_fraction_of_raw"] = results["save_mb_per_s"] / results["raw_write_mb_per_s"]
        results["restore_fraction_of_raw"] = (results["restore_mb_per_s"]
                                              / results["raw_read_mb_per_s"])
    return results


def compare(cfg, repeats: int, step_time: float, directory: str | None = None,
            backends: tuple[str, ...] = BACKENDS) -> dict:
    """The method above for cfg's train state, `repeats` rounds of one trial per backend in
    scratch space under `directory` (the emulator's files too): {backend: results}, plus
    "gs_vs_local" when both ran."""
    unknown = set(backends) - set(BACKENDS)
    if unknown or not backends:
        raise ValueError(f"backends: {sorted(unknown) or 'none'}; choose from {BACKENDS}")
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    scratch = Path(tempfile.mkdtemp(prefix="maxgpt-ckpt-bench-", dir=directory))
    server = log = prefix = None
    restore_env = contextlib.ExitStack()
    try:
        if "gs" in backends:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests import emulator

            (scratch / "local").mkdir()
            log_path = scratch / "emulator.log"
            with open(log_path, "wb") as out:
                url, server = emulator.start(scratch / "gcs", log=out)
            # Before any gs:// call: gcsfs and tensorstore read these when first used.
            restore_env.enter_context(emulator.environment(emulator.client_env(url)))
            log = RequestLog(log_path)
            prefix = f"gs://{emulator.BUCKET}/ckpt-bench-{uuid.uuid4().hex[:8]}"
        local = scratch / "local" if "gs" in backends else scratch
        trials: dict[str, list[dict]] = {b: [] for b in backends}
        with jax.set_mesh(trainer.mesh):
            state = init_state(trainer)
            size = sum(x.nbytes for x in jax.tree.leaves(state))
            for i in range(repeats):
                for backend in backends:
                    if backend == "local":
                        run = local / f"run{i}"
                        trial = _trial(trainer, cfg, state, size, str(run), None)
                        w, ws, r = raw_disk(local, size)
                        trial.update(disk_write=w, disk_sync=ws, disk_read=r)
                        shutil.rmtree(run)
                    else:
                        run = f"{prefix}/run{i}"
                        trial = _trial(trainer, cfg, state, size, run, log)
                        w, r = raw_gcs(prefix, size)
                        seconds, requests = exists_check(prefix, log)
                        trial.update(raw_write=w, raw_read=r, exists_s=seconds,
                                     exists_requests=requests)
                        as_path(run).rmtree()
                    trials[backend].append(trial)
    finally:
        restore_env.close()
        if server is not None:
            emulator.stop(server)
        shutil.rmtree(scratch, ignore_errors=True)

    results = {b: _summary(trials[b], size, step_time) for b in backends}
    if len(backends) == 2:
        gs, loc = results["gs"], results["local"]
        results["gs_vs_local"] = {
            "save_blocking_ratio": gs["save_blocking_s"] / loc["save_blocking_s"],
            "save_blocking_diff_ms": (gs["save_blocking_s"] - loc["save_blocking_s"]) * 1e3,
            "save_blocking_diff_exists_checks": ((gs["save_blocking_s"] - loc["save_blocking_s"])
                                                 / (gs["exists_check_ms"] / 1e3)),
            "save_throughput_ratio": gs["save_mb_per_s"] / loc["save_mb_per_s"],
            "restore_throughput_ratio": gs["restore_mb_per_s"] / loc["restore_mb_per_s"],
        }
    return results


def measure(cfg, repeats: int, step_time: float, directory: str | None = None) -> dict:
    """The local backend alone (benchmarks/suite.py's checkpoint section)."""
    return compare(cfg, repeats, step_time, directory, ("local",))["local"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/bench-cpu.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, of local and gs (the emulator); default both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends {args.backends}: choose from {','.join(BACKENDS)}")
    cfg = load_config(args.config, ["data.source=synthetic"])
    step_time = statistics.median(s for _, s in time_steps(cfg, args.steps))
    results = compare(cfg, args.repeats, step_time, args.dir, backends)
    if args.json:
        print(json.dumps(results))
        return
    for group, values in results.items():
        print(f"[{group}]")
        for key, value in values.items():
            print(f"  {key:34s} {value:,.3f}")


if __name__ == "__main__":
    main()
