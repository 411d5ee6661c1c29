"""One trainer per run directory: `RUN/owner.json` names the job that trains it.

    {"host": "...", "pid": 1234, "since": "2026-12-01T20:30:00Z", "heartbeat": 1796160000.0,
     "token": "..."}

Process 0 of a training job checks the record before anything else is read or written, and
writes it once the start or resume is accepted; a background thread refreshes `heartbeat`
every HEARTBEAT_S and the record is removed when the job ends. A second `maxgpt train` on the
same run directory is refused, naming the owner, while the owner is alive: on the same host
its pid still runs, on another host its heartbeat is younger than STALE_S. A dead owner
(same host, no such pid) or a silent one is taken over with a log line. Objects on gs://
hold the same record, so this works on bucket run directories too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from maxgpt import distributed
from maxgpt.config import ConfigError
from maxgpt.storage import one_line, write_atomic

HEARTBEAT_S = 60.0
# Twice the interval: one late write (slow storage, a paused host) is not taken for death.
STALE_S = 2 * HEARTBEAT_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _verdict(record: dict, now: float) -> tuple[bool, str]:
    """(whether the recorded owner is alive, why it is taken over if not)."""
    age = now - float(record.get("heartbeat", 0))
    if record.get("host") == socket.gethostname():
        if _alive(int(record.get("pid", -1))):
            return True, ""
        return False, f"pid {record.get('pid')} is not running on this host"
    if age <= STALE_S:
        return True, ""
    return False, f"its last heartbeat was {age:.0f} s ago"


class Owner:
    """This job's claim on a run directory (only process 0 writes or reads the record)."""

    def __init__(self, path):
        self.path = path
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "token": uuid.uuid4().hex}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def check(self) -> None:
        """Refuse (on every process) if another live job owns the run directory; note a dead
        or silent owner, which `claim` then replaces."""
        text = ""
        if distributed.is_leader() and self.path.is_file():
            try:
                record = json.loads(self.path.read_text())
            except (ValueError, OSError):
                record = {}  # unreadable: nobody can be shown to own it
            alive, why = _verdict(record, time.time())
            if alive:
                text = (f"{self.path.parent} is being trained by another maxgpt train: host "
                        f"{record.get('host')}, pid {record.get('pid')}, since "
                        f"{record.get('since')}; stop it first, or use another --run-dir "
                        "(nothing was changed)")
            elif record:
                print(f"maxgpt: taking over {self.path.parent} from host {record.get('host')} "
                      f"pid {record.get('pid')} ({why})", file=sys.stderr, flush=True)
        text = distributed.broadcast_text(text)
        if text:
            raise ConfigError(text)

    def _write(self) -> None:
        write_atomic(self.path, json.dumps({**self.record, "heartbeat": time.time()}).encode())

    def claim(self) -> None:
        """Write the record and keep its heartbeat fresh until `close`."""
        if not distributed.is_leader():
            return
        self._write()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="maxgpt-owner")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as e:  # storage hiccup: the next beat tries again
                print(f"maxgpt: could not refresh {self.path} ({one_line(e)})",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the heartbeat and remove the record, if it is still this job's."""
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join()
        self.thread = None
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (ValueError, OSError):
            pass
