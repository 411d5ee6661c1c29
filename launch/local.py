"""Run one maxgpt command as several JAX processes on this machine (simulated CPU devices).

    python launch/local.py --processes 2 --devices-per-process 4 -- maxgpt train ...
    python launch/local.py --processes 2 --devices-per-process 4 --dry-run -- maxgpt train

Each process gets JAX_PLATFORMS=cpu, its own D simulated devices, and MAXGPT_COORDINATOR /
MAXGPT_NUM_PROCESSES / MAXGPT_PROCESS_ID (maxgpt/distributed.py), so the processes form one
multi-controller JAX program with gloo collectives: the multi-host code paths (per-process
data shares, cooperative checkpoints, the preemption sync point) on one machine. Output lines
are prefixed with the process index. SIGTERM and SIGINT (Ctrl-C) reach every process as
SIGTERM, which JAX's preemption notifier turns into one agreed stop step (the processes run
in their own session, so a terminal's Ctrl-C reaches only this launcher); if one process
fails the others are stopped. The exit code is the first non-zero one, else 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(processes: int, devices: int, port: int, base=None) -> list[dict]:
    base = dict(os.environ if base is None else base)
    flags = [f for f in base.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return [{**base, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
             "MAXGPT_COORDINATOR": f"127.0.0.1:{port}", "MAXGPT_NUM_PROCESSES": str(processes),
             "MAXGPT_PROCESS_ID": str(i)} for i in range(processes)]


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{index}] {line}")
        out.flush()


def run(command: list[str], processes: int, devices: int, port: int | None = None,
        grace_s: float = 30.0) -> int:
    envs = process_envs(processes, devices, port or free_port())
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for env in envs]
    pumps = [threading.Thread(target=_pump, args=(i, stream, out), daemon=True)
             for i, p in enumerate(procs)
             for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    for t in pumps:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failure, failed_at = 0, None
        while any(p.poll() is None for p in procs):
            for p in procs:
                if p.poll() not in (None, 0) and not first_failure:
                    first_failure, failed_at = p.returncode, time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:  # the others would wait forever in a collective
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        for t in pumps:
            t.join()
        codes = [p.returncode for p in procs]
        return first_failure or next((c for c in codes if c != 0), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each process's environment and command, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. maxgpt train ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1 or args.devices_per_process < 1:
        parser.error("give --processes >= 1, --devices-per-process >= 1 and -- COMMAND")
    if args.dry_run:
        port = args.port or 12355
        for env in process_envs(args.processes, args.devices_per_process, port, base={}):
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        return 0
    return run(command, args.processes, args.devices_per_process, args.port or None)


if __name__ == "__main__":
    sys.exit(main())
