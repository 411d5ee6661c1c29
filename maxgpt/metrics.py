"""Where numbers go: RUN_DIR/metrics.jsonl, TensorBoard event files, and one console line.

Only process 0 writes. Each train row carries at least
`step, loss, lr, grad_norm, tokens_per_sec, step_time_s, mfu, tokens_seen`; each eval row
`step, eval_loss, eval_ppl, eval_bpb, eval_tokens` (see docs/metrics.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax


def _plain(value: Any) -> Any:
    """JSON-safe scalars: non-finite floats become null rather than invalid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_row(row: dict[str, Any], total_steps: int) -> str:
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


class MetricsWriter:
    def __init__(self, run_dir: Path | None, total_steps: int, echo: bool = True):
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        self.echo = echo and self.enabled
        self.file = self.tensorboard = None
        if run_dir is not None and self.enabled:
            from tensorboardX import SummaryWriter  # heavy import, only when writing a run

            self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def drop_rows_after(self, step: int) -> None:
        """Forget rows past `step` (a run resumed from its step-`step` checkpoint trains and
        logs those steps again; metrics.jsonl keeps one row per step and kind)."""
        if self.file is None:
            return
        path = Path(self.file.name)
        self.file.close()
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in rows))
        tmp.replace(path)
        self.file = open(path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Log one row (JSON, TensorBoard, console); returns it as written."""
        row = {k: _plain(v) for k, v in row.items()}
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.tensorboard.add_scalar(name, value, row["step"])
        if self.echo:
            print(format_row(row, self.total_steps), flush=True)
        return row

    def info(self, text: str) -> None:
        if self.echo:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
