"""A TPU pod slice with `gcloud`: create it, copy this checkout, install, run maxgpt on every
worker, follow the logs, delete it. Every step prints its command with --dry-run.

    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 create
    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 copy
    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 install
    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 run -- \\
        maxgpt train --config configs/models/llama3-8b.yaml --run-dir gs://bucket/runs/x
    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 logs
    python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256 delete

`copy` sends the committed tree (`git archive HEAD`). `run` starts the command on all workers
at once, in the background with its output in ~/maxgpt.log on each; the workers find each
other through the TPU metadata (MAXGPT_DISTRIBUTED=auto, maxgpt/distributed.py). A
preempted (spot) slice sends SIGTERM: maxgpt saves and exits 0; `run` again on a new slice
resumes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from maxgpt.chips import parse_slice
from maxgpt.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
LOG = "~/maxgpt.log"


def commands(action: str, name: str, zone: str, slice_name: str, command: list[str],
             spot: bool = False, project: str = "") -> list[list[str]]:
    chip, _ = parse_slice(slice_name)  # refuses unknown slices before anything runs
    if chip.torus_dims == 0:
        raise ConfigError(f"{slice_name} is not a TPU slice")
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", zone, *(["--project", project] if project else [])]

    def on_workers(shell: str, worker: str = "all") -> list[str]:
        return [*base, "ssh", name, *where, f"--worker={worker}", "--command", shell]

    accelerator = slice_name.replace("v5e-", "v5litepod-")
    if action == "create":
        return [[*base, "create", name, *where, "--accelerator-type", accelerator,
                 "--version", RUNTIMES[chip.name], *(["--spot"] if spot else [])]]
    if action == "copy":  # the committed tree (no virtualenv, no runs), to every worker
        archive = f"/tmp/maxgpt-{name}.tar.gz"
        return [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, "HEAD"],
                [*base, "scp", archive, f"{name}:maxgpt.tar.gz", *where, "--worker=all"],
                on_workers("mkdir -p ~/maxgpt && tar xzf ~/maxgpt.tar.gz -C ~/maxgpt")]
    if action == "install":
        return [on_workers("cd ~/maxgpt && python3 -m pip install -e '.[tpu]'")]
    if action == "run":
        if not command:
            raise ConfigError("run needs -- COMMAND")
        return [on_workers(f"cd ~/maxgpt && MAXGPT_DISTRIBUTED=auto nohup "
                           f"{shlex.join(command)} > {LOG} 2>&1 &")]
    if action == "logs":
        return [on_workers(f"tail -n 100 -f {LOG}", worker="0")]
    if action == "delete":
        return [[*base, "delete", name, *where, "--quiet"]]
    raise ConfigError(f"unknown action {action!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the TPU VM's name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--slice", required=True, help="e.g. v5p-256, v6e-64, v5e-16")
    parser.add_argument("--project", default="")
    parser.add_argument("--spot", action="store_true", help="create: a preemptible slice")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("action", choices=("create", "copy", "install", "run", "logs",
                                           "delete"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        todo = commands(args.action, args.name, args.zone, args.slice, command, args.spot,
                        args.project)
    except ConfigError as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        return 2
    for cmd in todo:
        if args.dry_run:
            print(shlex.join(cmd))
        elif (code := subprocess.run(cmd).returncode) != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
