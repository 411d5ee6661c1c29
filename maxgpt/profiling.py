"""Profiling a training run: `train.profile_steps=A:B`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax

from maxgpt.run_dir import RunDir
from maxgpt.storage import is_remote, upload_tree


class Profile:
    """`train.profile_steps=A:B`: a jax.profiler trace of steps A..B (inclusive) written to
    RUN_DIR/profile by every process (TensorBoard's profile plugin or Perfetto read it). For a
    remote run directory the trace is written locally and uploaded when it ends."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: RunDir | None, writer):
        self.steps, self.writer, self.active = steps, writer, False
        self.directory = None if run_dir is None else run_dir.profile
        if steps is not None and run_dir is None:
            writer.info("maxgpt: train.profile_steps needs a run directory; not profiling")
            self.steps = None

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            remote = is_remote(self.directory)
            self.local = Path(tempfile.mkdtemp(prefix="maxgpt-profile-") if remote else
                              self.directory)
            jax.profiler.start_trace(os.fspath(self.local))
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
            if is_remote(self.directory):
                upload_tree(self.local, self.directory)
                shutil.rmtree(self.local)
