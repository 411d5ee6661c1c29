"""Weights & Biases beside TensorBoard (maxgpt/trackers.py): an offline run's own files,
read back record by record, hold every row of metrics.jsonl; a restart continues the same
W&B run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from wandb.proto import wandb_internal_pb2

from tests.conftest import REPO


def records(path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB's log format: 32 KiB blocks of chunks (crc32c 4 bytes, length 2, type 1: full,
    2: first, 3: middle, 4: last), a block's tail of under 7 bytes left as padding."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir) -> tuple[list[str], list[dict]]:
    """(the W&B run ids, every logged row) of all offline runs written under run_dir/wandb."""
    ids, rows = [], []
    folders = sorted(p for p in os.listdir(run_dir / "wandb") if p.startswith("offline-run-"))
    for folder in folders:
        (name,) = [f for f in os.listdir(run_dir / "wandb" / folder) if f.endswith(".wandb")]
        ids.append(name[len("run-"):-len(".wandb")])
        for record in records(run_dir / "wandb" / folder / name):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return ids, rows


def test_wandb_offline_run_holds_every_metrics_row_and_a_restart_continues_it(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "maxgpt", "train", "--run-dir", str(run_dir), "--config",
            os.path.join(REPO, "configs/experiments/smoke.yaml"), "train.log_every=2",
            "train.eval_every=4", "checkpoint.every=4", "data.num_workers=0",
            "metrics.wandb_project=maxgpt-test", "metrics.wandb_mode=offline"]
    for steps in (6, 8):  # a second command continues the run (a restart)
        done = subprocess.run([*args, f"train.steps={steps}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "wandb:" not in done.stderr  # silent: maxgpt's own lines only
    ids, logged = history(run_dir)
    assert len(ids) == 2 and ids[0] == ids[1]  # the same W&B run, continued
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} >= {2, 4, 6, 8} and any("eval_loss" in r for r in rows)
    for row in rows:  # each row of the finished run, under TensorBoard's names
        want = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                for k, v in row.items() if k != "step"}
        have = [r for r in logged if r["step"] == row["step"] and set(want) <= set(r)]
        assert have, row
        for key, value in want.items():
            assert math.isclose(have[-1][key], value, rel_tol=1e-12), (key, have[-1], row)
