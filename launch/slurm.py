"""Write (and optionally submit) a SLURM batch script that runs one maxgpt process per node.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --dry-run -- maxgpt train --config configs/models/llama3-8b.yaml mesh.fsdp=-1
    python launch/slurm.py ... --out job.sbatch --submit -- maxgpt train ...

`srun` starts one task per node; JAX detects SLURM and joins the tasks
(maxgpt/distributed.py), each task driving its node's GPUs. `--signal=TERM@SECONDS` asks
SLURM to send SIGTERM to the tasks that long before the time limit: maxgpt finishes the
step, saves a checkpoint and exits 0, and the next job with the same `--run-dir` resumes.

Every node must see the same run directory: put --run-dir on a file system all nodes mount
(a parallel file system such as Lustre or GPFS, or NFS) or on gs://, never on a node's local
disk (/tmp, local scratch). maxgpt checks at start that all processes see the same one.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def script(command: list[str], nodes: int, gpus_per_node: int, time: str, partition: str = "",
           account: str = "", job_name: str = "maxgpt", signal_s: int = 300,
           setup: str = "") -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}",
             f"#SBATCH --time={time}", "#SBATCH --output=%x-%j.out",
             f"#SBATCH --signal=TERM@{signal_s}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += ["# --run-dir must be one directory that every node sees: a shared file system",
              "# (Lustre, GPFS, NFS) or gs://, not a node's local disk. maxgpt checks it at start.",
              "set -euo pipefail", *([setup] if setup else []),
              "export MAXGPT_DISTRIBUTED=auto  # one JAX process per node, found through SLURM",
              f"srun --kill-on-bad-exit=1 {shlex.join(command)}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="the job's time limit")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--job-name", default="maxgpt")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="SIGTERM this long before the time limit (a checkpoint is saved)")
    parser.add_argument("--setup", default="", help="a shell line run first, e.g. "
                                                    "'source ~/venv/bin/activate'")
    parser.add_argument("--out", default="maxgpt.sbatch", help="where the script is written")
    parser.add_argument("--submit", action="store_true", help="run sbatch on it")
    parser.add_argument("--dry-run", action="store_true", help="print the script only")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nodes < 1 or args.gpus_per_node < 0:
        parser.error("give --nodes >= 1 and -- COMMAND")
    text = script(command, args.nodes, args.gpus_per_node, args.time, args.partition,
                  args.account, args.job_name, args.signal_seconds, args.setup)
    if args.dry_run:
        print(text, end="")
        return 0
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if args.submit:
        if code := subprocess.run(["sbatch", args.out]).returncode:
            print(f"launch/slurm.py: sbatch exited {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
