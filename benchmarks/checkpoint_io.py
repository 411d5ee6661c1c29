"""Checkpoint cost: how long a save blocks the training loop, and save/restore throughput
against this machine's raw disk speed, measured in the same run.

Method: the benchmark shape (configs/experiments/bench-cpu.yaml: params, AdamW moments and
counters of a 66M-parameter model, fp32) is initialised on one device and saved with the
same `Checkpointer` that `maxgpt train` uses, `--repeats` times into a scratch directory:

- blocking time: how long `Checkpointer.save` takes to return (orbax copies the arrays off
  the device, then writes in the background), against the median train step of the same
  shape (train_throughput.py's `time_steps`);
- save throughput: state bytes / time from the save call until the write is committed;
- restore throughput: state bytes / time of `Checkpointer.restore` into the shardings;
- raw disk: the same number of bytes written to one file in the same directory with 64 MiB
  `write` calls, once as orbax writes (no `fsync`: the data may still sit in the page cache
  when the save is committed) and once with an `fsync` at the end, then read back. Reads
  (ours and orbax's) come from the page cache when it holds the data: both see the same.

Medians over the repeats. Results are recorded in docs/benchmarks.md.

    python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
from train_throughput import time_steps  # benchmarks/ is on sys.path when run as a script

from maxgpt import sharding
from maxgpt.checkpoint import Checkpointer
from maxgpt.config import load_config
from maxgpt.train import abstract_state, build_trainer, init_state

CHUNK = 64 * 2**20


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


def measure(cfg, repeats: int, step_time: float, directory: str | None = None) -> dict:
    """The method above for cfg's train state, `repeats` times in a scratch directory under
    `directory`, the blocking time compared with `step_time` seconds per train step."""
    trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    scratch = Path(tempfile.mkdtemp(prefix="maxgpt-ckpt-bench-", dir=directory))
    blocking, save, restore, disk_write, disk_sync, disk_read = [], [], [], [], [], []
    with jax.set_mesh(trainer.mesh):
        state = init_state(trainer)
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        for i in range(repeats):
            checkpointer = Checkpointer(scratch / f"run{i}")
            start = time.perf_counter()
            checkpointer.save(1, state, {}, cfg, None)
            blocking.append(time.perf_counter() - start)
            checkpointer.manager.wait_until_finished()
            save.append(size / (time.perf_counter() - start))
            start = time.perf_counter()
            restored, _ = checkpointer.restore(1, abstract_state(trainer),
                                               trainer.state_shardings, data=False)
            jax.block_until_ready(restored)
            restore.append(size / (time.perf_counter() - start))
            checkpointer.close()
            w, ws, r = raw_disk(scratch, size)
            disk_write.append(w)
            disk_sync.append(ws)
            disk_read.append(r)
            shutil.rmtree(scratch / f"run{i}")
    shutil.rmtree(scratch)

    mb = 1e6
    results = {
        "state_mb": size / mb, "step_time_s": step_time,
        "save_blocking_s": statistics.median(blocking),
        "save_blocking_fraction_of_step": statistics.median(blocking) / step_time,
        "save_mb_per_s": statistics.median(save) / mb,
        "restore_mb_per_s": statistics.median(restore) / mb,
        "disk_write_mb_per_s": statistics.median(disk_write) / mb,
        "disk_write_fsync_mb_per_s": statistics.median(disk_sync) / mb,
        "disk_read_mb_per_s": statistics.median(disk_read) / mb,
    }
    results["save_fraction_of_disk"] = results["save_mb_per_s"] / results["disk_write_mb_per_s"]
    results["restore_fraction_of_disk"] = (results["restore_mb_per_s"]
                                           / results["disk_read_mb_per_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/experiments/bench-cpu.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.source=synthetic"])
    step_time = statistics.median(s for _, s in time_steps(cfg, args.steps))
    results = measure(cfg, args.repeats, step_time, args.dir)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:34s} {value:,.3f}")


if __name__ == "__main__":
    main()
