"""A TPU pod slice with `gcloud`: create it, copy this checkout, install, run maxgpt on every
worker, read the logs, delete it. Every action prints its commands instead with --dry-run.

    T="python launch/tpu.py --name run1 --zone us-east5-a --slice v5p-256"
    $T create --spot
    $T copy
    $T install
    $T run -- maxgpt train --config configs/models/llama3-8b.yaml --run-dir gs://bucket/runs/x
    $T logs
    $T delete

`copy` sends the committed tree (`git archive HEAD`) to ~/maxgpt on every worker. `install`
makes a Python 3.12 virtualenv, ~/maxgpt/.venv, with uv (the runtimes' python3 is Ubuntu
22.04's 3.10; maxgpt needs 3.11 or 3.12) and installs maxgpt[tpu] into it. `run` runs the
command with that environment on all workers at once and returns when every worker's process
has ended: 0 if all exited 0, non-zero otherwise. Each worker keeps the output in ~/maxgpt.log
and the exit code in ~/maxgpt.exit. `run --detach` starts the job in its own session and
returns at once; `wait` waits for it on every worker and fails if any failed; `status` says
where it stands without waiting. `logs` prints (`--follow`: follows) every worker's log. All
remote output is prefixed `[worker N]`.

The workers find each other through the TPU metadata (MAXGPT_DISTRIBUTED=auto,
maxgpt/distributed.py). They share no disk, so on a multi-host slice the run directory must be
gs://. A preempted (spot) slice sends SIGTERM: maxgpt saves and exits 0; `run` again on a new
slice resumes.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from maxgpt.chips import parse_slice
from maxgpt.config import ConfigError
from maxgpt.run_dir import named_in

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
# Chips of the largest slice that is one TPU VM (the Cloud TPU docs' tables); larger slices
# are several VMs of 4 chips.
ONE_VM_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}

# Paths on every worker; the remote shell expands ~.
CHECKOUT = "~/maxgpt"
VENV = "~/maxgpt/.venv"
UV = "~/.local/bin/uv"  # where `pip install --user` puts it
LOG, EXIT, PID = "~/maxgpt.log", "~/maxgpt.exit", "~/maxgpt.pid"
PROGRAMS = {"maxgpt": f"{VENV}/bin/maxgpt", "python": f"{VENV}/bin/python",
            "python3": f"{VENV}/bin/python"}

# The worker's number, from the TPU metadata that JAX reads too (its host name if that fails).
WORKER = ("w=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/"
          "computeMetadata/v1/instance/attributes/agent-worker-number || hostname)")
RUNNING = f'kill -0 "$(cat {PID} 2>/dev/null)" 2>/dev/null'
# The job's state from what it leaves behind: its exit code (and exit with it), running, or
# no job at all (exit 1).
REPORT = (f'if [ -s {EXIT} ]; then c=$(cat {EXIT}); echo "exit $c"; exit "$c"; fi; '
          f'if {RUNNING}; then echo running; exit 0; fi; '
          f'echo "no job: no exit code in {EXIT} and no process"; exit 1')


def labelled(script: str) -> str:
    """A worker's shell line: `script` with every output line prefixed `[worker N] `, and the
    script's exit status (pipefail; sed's own is 0)."""
    return f'set -o pipefail; {WORKER}; {{ {script}; }} 2>&1 | sed -u "s/^/[worker $w] /"'


def job(command: list[str], slice_name: str, multi_host: bool) -> str:
    """The command as each worker runs it: the virtualenv's maxgpt (or python), found by path."""
    command = list(command)
    if not command:
        raise ConfigError("run needs -- COMMAND, e.g. run -- maxgpt train --run-dir gs://...")
    if command[0] not in PROGRAMS:
        raise ConfigError(f"run starts maxgpt from {VENV}: write -- maxgpt ... (or python ...), "
                          f"not {command[0]}")
    run_dir = named_in(command)
    if multi_host and (run_dir is not None or command[:2] == ["maxgpt", "train"]) \
            and not (run_dir or "").startswith("gs://"):
        raise ConfigError(f"{slice_name} is several TPU VMs and they share no disk: give "
                          f"--run-dir gs://BUCKET/PATH" + (f", not {run_dir}" if run_dir else
                                                           " (train's default is local)"))
    return " ".join(["MAXGPT_DISTRIBUTED=auto PYTHONUNBUFFERED=1", PROGRAMS[command[0]],
                     *map(shlex.quote, command[1:])])


def commands(action: str, name: str, zone: str, slice_name: str,
             command: list[str] | tuple = (), spot: bool = False, project: str = "", detach: bool = False,
             follow: bool = False) -> list[list[str]]:
    chip, chips = parse_slice(slice_name)  # refuses unknown slices before anything runs
    if chip.torus_dims == 0:
        raise ConfigError(f"{slice_name} is not a TPU slice")
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", zone, *(["--project", project] if project else [])]

    def on_workers(script: str) -> list[str]:  # gcloud fails if any worker's script failed
        return [*base, "ssh", name, *where, "--worker=all", "--command", labelled(script)]

    accelerator = slice_name.replace("v5e-", "v5litepod-")
    if action == "create":
        return [[*base, "create", name, *where, "--accelerator-type", accelerator,
                 "--version", RUNTIMES[chip.name], *(["--spot"] if spot else [])]]
    if action == "copy":  # the committed tree (no virtualenv, no runs), to every worker
        archive = str(Path(tempfile.gettempdir()) / f"maxgpt-{name}.tar.gz")
        return [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, "HEAD"],
                [*base, "scp", archive, f"{name}:maxgpt.tar.gz", *where, "--worker=all"],
                on_workers(f"mkdir -p {CHECKOUT} && tar xzf ~/maxgpt.tar.gz -C {CHECKOUT}")]
    if action == "install":  # whatever the image's python3, the job runs on uv's 3.12
        return [on_workers(f"cd {CHECKOUT} && python3 -m pip install --user --quiet uv && "
                           f"{UV} venv --allow-existing --python 3.12 {VENV} && "
                           f"{UV} pip install --python {VENV}/bin/python -e '.[tpu]'")]
    if action == "run":
        line = job(command, slice_name, multi_host=chips > ONE_VM_CHIPS[chip.name])
        if detach:  # its own session: it outlives the ssh connection
            inner = f"echo $$ > {PID}; {line} > {LOG} 2>&1; echo $? > {EXIT}"
            return [on_workers(f"cd {CHECKOUT} || exit 1; rm -f {EXIT} {PID}; setsid nohup "
                               f"bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null & "
                               f"echo started")]
        # In the foreground of ssh: gcloud returns when every worker's job has ended.
        return [on_workers(f"cd {CHECKOUT} || exit 1; rm -f {EXIT}; echo $$ > {PID}; "
                           f"{line} 2>&1 | tee {LOG}; c=${{PIPESTATUS[0]}}; echo $c > {EXIT}; "
                           f"exit $c")]  # maxgpt's exit status, not tee's
    if action == "wait":
        return [on_workers(f"while [ ! -s {EXIT} ] && {RUNNING}; do sleep 2; done; {REPORT}")]
    if action == "status":
        return [on_workers(REPORT)]
    if action == "logs":
        return [on_workers(f"tail -n 100 {'-f ' if follow else ''}{LOG}")]
    if action == "delete":
        return [[*base, "delete", name, *where, "--quiet"]]
    raise ConfigError(f"unknown action {action!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the TPU VM's name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--slice", required=True, help="e.g. v5p-256, v6e-64, v5e-16")
    parser.add_argument("--project", default="")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    also = argparse.ArgumentParser(add_help=False)  # --dry-run after the action works too
    also.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                      help="print the commands only")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {"create": "create the slice", "copy": "send the committed tree to every worker",
             "install": "a Python 3.12 virtualenv with maxgpt[tpu] on every worker (uv)",
             "run": "run -- maxgpt ... on every worker",
             "wait": "wait for a detached run; fail if any worker failed",
             "status": "each worker's job: running, or its exit code",
             "logs": "every worker's ~/maxgpt.log", "delete": "delete the slice"}
    sub = {action: actions.add_parser(action, parents=[also], help=text)
           for action, text in helps.items()}
    sub["create"].add_argument("--spot", action="store_true", help="a preemptible slice")
    sub["run"].add_argument("--detach", action="store_true",
                            help="start the job and return; then `wait` or `status`")
    sub["run"].add_argument("command", nargs=argparse.REMAINDER, help="-- maxgpt ...")
    sub["logs"].add_argument("--follow", "-f", action="store_true", help="keep following")
    args = parser.parse_args(argv)
    command = getattr(args, "command", [])
    command = command[1:] if command[:1] == ["--"] else command
    try:
        todo = commands(args.action, args.name, args.zone, args.slice, command,
                        getattr(args, "spot", False), args.project,
                        getattr(args, "detach", False), getattr(args, "follow", False))
    except ConfigError as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        return 2
    for cmd in todo:
        if args.dry_run:
            print(shlex.join(cmd))
        elif (code := subprocess.run(cmd).returncode) != 0:
            print(f"launch/tpu.py: {args.action} failed: {cmd[0]} exited {code}",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
