"""Stopping cleanly when asked: SIGTERM (a preempted VM, `kill`, SLURM, Kubernetes) or SIGINT
(Ctrl-C) lets the current step finish, a checkpoint is saved and the run exits 0.

One process: the signal sets a flag that the loop reads after each step; a second signal
restores the default handler's effect (stop now). Many processes: every process must stop
after the same step or the collective save deadlocks, so the decision is JAX's preemption
sync point (`multihost_utils.reached_preemption_sync_point`), which the coordination
service drives when any host receives SIGTERM. There no Python handler is installed: it
would replace the notifier that `jax.distributed.initialize` installed for SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        # Signal handlers can only be installed from the main thread (tests call run() from
        # worker threads sometimes); elsewhere the run simply cannot be stopped by a signal.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # asked twice: stop now, the default way
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        print(f"maxgpt: {self.signal_name}: stopping after the current step, with a checkpoint "
              "if the run has a directory (again: stop now, without one)", file=sys.stderr,
              flush=True)

    def __call__(self, step: int) -> bool:
        """Whether to stop after `step` (the same answer on every process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
