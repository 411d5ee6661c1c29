"""A Kubernetes JobSet manifest that runs maxgpt on GKE TPU slices (one pod per TPU host).

    python launch/gke.py --name run1 --slice v5p-256 --image IMAGE -- \\
        maxgpt train --config configs/models/llama3-8b.yaml --run-dir gs://bucket/runs/x
    python launch/gke.py ... --num-slices 2 -- maxgpt train ...   # multi-slice
    python launch/gke.py ... > jobset.yaml && kubectl apply -f jobset.yaml

Needs the JobSet controller on the cluster and a TPU node pool of that slice type; IMAGE is a
container with this checkout installed (`pip install -e '.[tpu]'`). Each slice is one
replicated Job of `hosts` pods (4 chips each), scheduled onto one slice by the node selector
for its accelerator and topology; JAX finds the processes through the JobSet environment
(MAXGPT_DISTRIBUTED=auto, maxgpt/distributed.py). A pod that gets SIGTERM (preemption,
node upgrade, `kubectl delete`) has --grace-seconds to save a checkpoint; the JobSet
restarts failed jobs `--max-restarts` times, and a restart resumes from the newest
checkpoint in --run-dir.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from maxgpt.chips import parse_slice, topology
from maxgpt.config import ConfigError

GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                    "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}


def manifest(name: str, slice_name: str, image: str, command: list[str], num_slices: int = 1,
             max_restarts: int = 3, grace_s: int = 300) -> dict:
    chip, chips = parse_slice(slice_name)
    if chip.name not in GKE_ACCELERATORS:
        raise ConfigError(f"{slice_name} is not a TPU slice GKE schedules")
    per_host = min(chips, chip.chips_per_host)
    hosts = chips // per_host
    container = {
        "name": "maxgpt", "image": image, "command": command,
        "env": [{"name": "MAXGPT_DISTRIBUTED", "value": "auto"}],
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": per_host}},
    }
    pod = {"spec": {
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[chip.name],
                         "cloud.google.com/gke-tpu-topology": topology(chip, chips)},
        "restartPolicy": "Never", "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": grace_s, "containers": [container]}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                     "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {"maxRestarts": max_restarts},
                 "replicatedJobs": [{"name": "slice", "replicas": num_slices, "template": {
                     "spec": {"parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                              "template": pod}}}]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the JobSet's name")
    parser.add_argument("--slice", required=True, help="e.g. v5p-256, v6e-64")
    parser.add_argument("--image", required=True, help="a container with maxgpt installed")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--max-restarts", type=int, default=3)
    parser.add_argument("--grace-seconds", type=int, default=300,
                        help="time between SIGTERM and SIGKILL: enough to save a checkpoint")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_slices < 1:
        parser.error("give --num-slices >= 1 and -- COMMAND")
    try:
        doc = manifest(args.name, args.slice, args.image, command, args.num_slices,
                       args.max_restarts, args.grace_seconds)
    except ConfigError as e:
        print(f"launch/gke.py: error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
