"""What a person sees while a run goes, and after: a live bar on a terminal or plain lines in
logs, the time each phase took, and an end-of-run summary.

Convention (as everywhere in maxgpt): logged rows go to stdout, everything about the run
(start-up lines, the summary) to stderr. `metrics.progress`:

- `lines` (and `auto` when stderr is not a terminal): the rows as plain lines, with
  `elapsed` and `eta` fields at the end, and no escape codes: logs stay greppable;
- `bar` (and `auto` on a terminal): the same lines scroll above a bar on stderr that moves
  every step: `train  45%|####   | 9/20 [00:02<00:02, loss 4.9732 | 19,537 tok/s]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any, Iterable

from tqdm import tqdm

# train  45%|#######        | 9/20 [00:02<00:02, loss 4.9732 | 19,537 tok/s]  (elapsed<ETA)
BAR_FORMAT = ("{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}{postfix}]")


def wants_bar(mode: str, stream=None) -> bool:
    """`metrics.progress` for this process: a bar on a terminal (auto), or as asked."""
    stream = sys.stderr if stream is None else stream
    return mode == "bar" or (mode == "auto" and stream.isatty())


def duration(seconds: float) -> str:
    """12.3 s -> '00:12', 3723 s -> '1:02:03' (tqdm's notation, as in the bar)."""
    return tqdm.format_interval(max(0.0, seconds))


class Console:
    """The run's console: rows to stdout, notes to stderr, both above the bar when there is
    one. Disabled (prints nothing) on processes other than 0 and with echo=False."""

    def __init__(self, mode: str = "lines", enabled: bool = True):
        self.enabled = enabled
        self.use_bar = enabled and wants_bar(mode)
        self.bar: tqdm | None = None
        self.first = self.total = 0
        self.started: float | None = None  # when the first training step was dispatched

    def start(self, first: int, total: int) -> None:
        """Training begins at step `first` of `total`."""
        self.first, self.total, self.started = first, total, time.perf_counter()
        if self.use_bar and first < total:
            try:  # a terminal that reports no size (0 x 0, where tqdm draws nothing)
                sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
            except (OSError, ValueError):
                sized = False
            columns, rows = (None, None) if sized else shutil.get_terminal_size()
            self.bar = tqdm(total=total, initial=first, desc="train", unit="step",
                            file=sys.stderr, bar_format=BAR_FORMAT, dynamic_ncols=sized,
                            ncols=columns, nrows=rows, mininterval=0.25, smoothing=0.3)

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def row(self, row: dict[str, Any], text: str) -> None:
        """One logged row, `text` being its plain line; train rows get elapsed and ETA."""
        if not self.enabled:
            return
        if "loss" in row and self.started is not None and row["step"] > self.first:
            elapsed = time.perf_counter() - self.started
            left = elapsed / (row["step"] - self.first) * (self.total - row["step"])
            text += f" | elapsed {duration(elapsed)} | eta {duration(left)}"
            if self.bar is not None:  # short enough for 80 columns; the line has the rest
                loss = "nan" if row["loss"] is None else f"{row['loss']:.4f}"
                self.bar.set_postfix_str(f"loss {loss} | {row['tokens_per_sec']:,.0f} tok/s",
                                         refresh=False)
        self.say(text, sys.stdout)

    def note(self, text: str) -> None:
        self.say(text, sys.stderr)

    def say(self, text: str, file) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=file)  # clears the bar, prints, redraws it
            file.flush()
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): what the interpreter and
    the imports of jax took before maxgpt could time anything itself."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Wall time per phase of a run, in the order the phases first ran."""

    def __init__(self):
        self.started = time.perf_counter()
        self.before = process_age()  # the interpreter and imports, before `started`
        self.spent: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.spent[name] = self.spent.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wall(self) -> float:
        return time.perf_counter() - self.started + (self.before or 0.0)

    def describe(self) -> str:
        parts = ([] if self.before is None else [("python and jax imports", self.before)])
        parts += list(self.spent.items())
        parts.append(("other", self.wall() - sum(seconds for _, seconds in parts)))
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts
                         if seconds >= 0.05)


def _best(rows: list[dict], key: str) -> tuple[dict, dict] | None:
    """(the last row, the row with the lowest `key`) among rows that have a finite one."""
    rows = [r for r in rows if r.get(key) is not None]
    return (rows[-1], min(rows, key=lambda r: r[key])) if rows else None


def summary(rows: Iterable[dict], phases: Phases, *, run_dir, total_steps: int,
            trained_steps: int, flops_per_step: float, peak: float | None,
            peak_source: str, has_text: bool, stopped: bool) -> str:
    """The end-of-run lines (for stderr): steps, tokens, where the time went, final and best
    losses (over the run's metrics.jsonl rows), MFU of this session's training steps, the
    run directory and the commands to try next."""
    rows = list(rows)
    train = [r for r in rows if "loss" in r]
    step = train[-1]["step"] if train else 0
    tokens = train[-1]["tokens_seen"] if train else 0
    now = "" if trained_steps == step else f" ({trained_steps} of them in this session)"
    lines = [f"maxgpt: {'stopped' if stopped else 'done'} at step {step}/{total_steps}{now},"
             f" {tokens:,} tokens seen, in {phases.wall():.1f} s",
             f"  time: {phases.describe()}"]
    losses = []
    for name, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        found = _best(rows, key)
        if found:
            last, best = found
            losses.append(f"{name} {last[key]:.4f} final, {best[key]:.4f} best "
                          f"(step {best['step']})")
    if losses:
        lines.append("  " + "; ".join(losses))
    seconds = phases.spent.get("training", 0.0)
    steady = trained_steps - 1  # the first step is timed on its own (the data starts)
    if steady > 0 and seconds > 0:
        rate = flops_per_step * steady / seconds
        mfu = (f"mfu {100 * rate / peak:.1f}% of {peak / 1e9:,.0f} GFLOP/s, {peak_source}"
               if peak else "mfu unknown (no peak known for this device)")
        lines.append(f"  {mfu}; {flops_per_step * steady / seconds / 1e9:,.1f} GFLOP/s "
                     f"achieved over the {steady} step{'s' * (steady != 1)} after the first")
    if run_dir is None:  # a run without a directory (tests, benchmarks) has nothing to try
        return "\n".join(lines)
    lines.append(f"  run directory: {run_dir}")
    if not stopped:
        name = os.path.basename(str(run_dir).rstrip("/")) or "run"
        commands = [f"maxgpt eval --run-dir {run_dir}",  # these need its text and tokenizer
                    f'maxgpt generate --run-dir {run_dir} --prompt "def "',
                    f"maxgpt export --run-dir {run_dir} --out exports/{name}"] if has_text else []
        commands.append(f"tensorboard --logdir {str(run_dir).rstrip('/')}/tensorboard"
                        "   (pip install 'maxgpt[tensorboard]')")
        lines.append("  next: " + "\n        ".join(commands))
    return "\n".join(lines)


def rows_of(lines: Iterable[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.strip()]
