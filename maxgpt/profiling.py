"""Profiling a training run: `train.profile_steps=A:B`."""

from __future__ import annotations

from pathlib import Path

import jax


class Profile:
    """`train.profile_steps=A:B`: a jax.profiler trace of steps A..B (inclusive) written to
    RUN_DIR/profile by every process (TensorBoard's profile plugin or Perfetto read it)."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: Path | None, writer):
        self.steps, self.writer, self.active = steps, writer, False
        self.directory = None if run_dir is None else run_dir / "profile"
        if steps is not None and run_dir is None:
            writer.info("maxgpt: train.profile_steps needs a run directory; not profiling")
            self.steps = None

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, metrics) -> None:
        if self.active and step == self.steps[1]:
            jax.block_until_ready(metrics)  # the trace holds the whole of step B
            self.stop()
            self.writer.info(f"maxgpt: profile of steps {self.steps[0]}-{step} written to "
                             f"{self.directory}")

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
