"""Where numbers go: RUN_DIR/metrics.jsonl, TensorBoard event files, and one console line.

Only process 0 writes; the file may be local or on object storage (see MetricsWriter). Each train row carries at least
`step, loss, lr, grad_norm, tokens_per_sec, step_time_s, mfu, tokens_seen`; each eval row
`step, eval_loss, eval_ppl, eval_bpb, eval_tokens` (see docs/metrics.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from maxgpt import distributed
from maxgpt.run_dir import RunDir
from maxgpt.storage import is_remote, one_line, write_atomic
from maxgpt.trackers import scalar_name


def _plain(value: Any) -> Any:
    """JSON-safe scalars: non-finite floats become null rather than invalid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_row(row: dict[str, Any], total_steps: int) -> str:
    tasks = {k[len("eval_task/"):]: v for k, v in row.items() if k.startswith("eval_task/")}
    if tasks:  # lm-eval task metrics (maxgpt/harness.py)
        return f"tasks {row['step']}/{total_steps} | " + " | ".join(
            f"{k} {'nan' if v is None else format(v, '.4g')}" for k, v in tasks.items())
    if "eval_loss" in row:
        return (f"eval {row['step']}/{total_steps} | loss {row['eval_loss']:.4f} | "
                f"ppl {row['eval_ppl']:.2f} | {row['eval_bpb']:.4f} bits/byte | "
                f"{row['eval_tokens']:,} tokens")
    def num(key, spec):  # non-finite values are logged as null
        return "nan" if row[key] is None else format(row[key], spec)

    parts = [f"step {row['step']}/{total_steps}", f"loss {num('loss', '.4f')}",
             f"lr {row['lr']:.2e}", f"gnorm {num('grad_norm', '.3f')}",
             f"{row['tokens_per_sec']:,.0f} tok/s", f"{row['step_time_s']:.3f} s/step"]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if row.get("skipped_steps"):
        parts.append(f"skipped {row['skipped_steps']}")
    if "moe_balance_loss" in row:
        dropped = 100 * (row["moe_dropped"] or 0)
        parts.append(f"moe balance {num('moe_balance_loss', '.3f')} load "
                     f"{num('moe_load_max_mean', '.2f')} dropped {dropped:.1f}%")
    return " | ".join(parts)


class _Uploader(threading.Thread):
    """Writes the newest content of files in the background, so that the training loop never
    waits on storage; a content handed over while a write runs replaces any older one of
    the same file still waiting."""

    def __init__(self):
        super().__init__(daemon=True, name="maxgpt-metrics")
        self.pending: dict[Any, bytes] = {}
        self.closed, self.failed = False, False
        self.condition = threading.Condition()

    def put(self, path, data: bytes) -> None:
        with self.condition:
            self.pending[path] = data
            self.condition.notify()

    def run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.closed:
                    self.condition.wait()
                if not self.pending:
                    return
                path, data = self.pending.popitem()
            try:
                write_atomic(path, data)
                self.failed = False
            except Exception as e:  # storage down: report once, try again with the next row
                if not self.failed:
                    print(f"maxgpt: could not write {path} ({one_line(e)}); will retry",
                          file=sys.stderr, flush=True)
                self.failed = True

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.join()


class MetricsWriter:
    """Rows go to RUN/metrics.jsonl, which is rewritten whole (atomically, in a background
    thread) after every row: object storage cannot append, and a killed run loses at most
    the rows of the write still in flight.

    TensorBoard event files of a remote run are written to a local folder and copied to
    RUN/tensorboard/ the same way (tensorboardX's own gs:// writer uploads in the loop's
    threads and again at interpreter exit, where an unreachable bucket hangs it 120 s)."""

    console = None  # a maxgpt.progress.Console the loop sets: the bar, elapsed and ETA

    def __init__(self, run_dir: RunDir | None, total_steps: int, echo: bool = True,
                 tracker=None):
        self.total_steps = total_steps
        self.tracker = tracker  # maxgpt/trackers.py (W&B), process 0 only; or None
        self.enabled = distributed.is_leader()
        self.echo = echo and self.enabled
        self.lines: list[str] = []
        self.run_dir, self.uploader, self.tensorboard, self.events = None, None, None, None
        if run_dir is not None and self.enabled:
            from tensorboardX import SummaryWriter  # heavy import, only when writing a run

            self.run_dir = run_dir
            if run_dir.metrics_file.is_file():
                self.lines = [line for line in run_dir.metrics_file.read_text().splitlines()
                              if line.strip()]
            self.uploader = _Uploader()
            self.uploader.start()
            if is_remote(run_dir.path):
                self.events = Path(tempfile.mkdtemp(prefix="maxgpt-tensorboard-"))
            self.tensorboard = SummaryWriter(os.fspath(self.events or run_dir.tensorboard))

    def _flush(self) -> None:
        if self.uploader is None:
            return
        self.uploader.put(self.run_dir.metrics_file,
                          "".join(line + "\n" for line in self.lines).encode())
        if self.events is not None and self.tensorboard is not None:
            with self._tensorboard_errors():
                self.tensorboard.flush()
            self._put_events()

    def _put_events(self) -> None:
        for path in self.events.iterdir():
            self.uploader.put(self.run_dir.tensorboard / path.name, path.read_bytes())

    def drop_rows_after(self, step: int) -> None:
        """Forget rows past `step` (a run resumed from its step-`step` checkpoint trains and
        logs those steps again; metrics.jsonl keeps one row per step and kind)."""
        kept = [line for line in self.lines if json.loads(line).get("step", 0) <= step]
        if kept != self.lines:
            self.lines = kept
            self._flush()

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Log one row (JSON, TensorBoard, console); returns it as written."""
        row = {k: _plain(v) for k, v in row.items()}
        if self.tensorboard is not None:
            with self._tensorboard_errors():
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.tensorboard.add_scalar(scalar_name(key), value, row["step"])
        if self.tracker is not None:
            self.tracker.log(row)
        if self.uploader is not None:
            self.lines.append(json.dumps(row))
            self._flush()
        if self.echo and self.console is not None:  # elapsed, ETA; above the bar
            self.console.row(row, format_row(row, self.total_steps))
        elif self.echo:
            print(format_row(row, self.total_steps), flush=True)
        return row

    def info(self, text: str) -> None:
        if self.echo and self.console is not None:
            self.console.note(text)
        elif self.echo:
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _tensorboard_errors(self):
        """A full disk must not turn logging into a crash: TensorBoard is given up (once,
        said on stderr); metrics.jsonl and the checkpoints carry on or fail on their own."""
        try:
            yield
        except OSError as e:
            print(f"maxgpt: TensorBoard events could not be written ({one_line(e)}); "
                  "going on without them", file=sys.stderr, flush=True)
            self.tensorboard = None

    def close(self) -> None:
        if self.tensorboard is not None:
            with self._tensorboard_errors():
                self.tensorboard.close()
        if self.events is not None:
            self._put_events()  # the closed event files, whole
        if self.uploader is not None:
            self.uploader.close()
        if self.events is not None:
            shutil.rmtree(self.events, ignore_errors=True)
        if self.tracker is not None:
            self.tracker.close()

