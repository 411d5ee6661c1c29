"""A Kubernetes JobSet manifest that runs maxgpt on GKE TPU slices (one pod per TPU host).

    python launch/gke.py --name run1 --slice v5p-256 --image IMAGE --service-account maxgpt \\
        --data-bucket gs://bucket/data -- \\
        maxgpt train --config configs/models/llama3-8b.yaml --run-dir gs://bucket/runs/x
    python launch/gke.py ... --num-slices 2 -- maxgpt train ...   # multi-slice
    python launch/gke.py ... > jobset.yaml && kubectl apply -f jobset.yaml
    python launch/gke.py ... --apply -- maxgpt train ...          # the same in one step

Needs the JobSet controller on the cluster and a TPU node pool of that slice type; IMAGE is a
container with this checkout installed (`pip install -e '.[tpu]'`). Each slice is one
replicated Job of `hosts` pods (4 chips each), scheduled onto one slice by the node selector
for its accelerator and topology; JAX finds the processes through the JobSet environment
(MAXGPT_DISTRIBUTED=auto, maxgpt/distributed.py). A pod that gets SIGTERM (preemption,
node upgrade, `kubectl delete`) has --grace-seconds to save a checkpoint; the JobSet
restarts failed jobs `--max-restarts` times, and a restart resumes from the newest
checkpoint in --run-dir, which must be gs://: pods share no disk and lose their own when
they end.

Buckets are reached as the Kubernetes service account --service-account (Workload Identity:
give that account access to the buckets). --data-bucket mounts gs://BUCKET[/FOLDER] read-only
at /data with the Cloud Storage FUSE CSI driver. Multi-slice pods use the host network (DCN
bandwidth between slices); there the FUSE mount still uses the service account
(hostNetworkPodKSA), but maxgpt's own gs:// reads and writes go as the node pool's service
account, which then needs the run bucket too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import yaml

from maxgpt.chips import parse_slice, topology
from maxgpt.config import ConfigError
from maxgpt.run_dir import named_in

GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                    "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
DATA = "/data"  # where --data-bucket is mounted in every pod


def data_volume(bucket_uri: str, host_network: bool) -> dict:
    """gs://BUCKET[/FOLDER] as a read-only Cloud Storage FUSE (gcsfuse CSI) volume."""
    bucket, _, folder = bucket_uri.removeprefix("gs://").partition("/")
    if not bucket_uri.startswith("gs://") or not bucket:
        raise ConfigError(f"--data-bucket {bucket_uri!r}: write gs://BUCKET or gs://BUCKET/FOLDER")
    options = ["implicit-dirs", *([f"only-dir={folder.strip('/')}"] if folder.strip("/") else [])]
    attributes = {"bucketName": bucket, "mountOptions": ",".join(options)}
    if host_network:  # else the mount would authenticate as the node, not the service account
        attributes["hostNetworkPodKSA"] = "true"
    return {"name": "data", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
                                    "volumeAttributes": attributes}}


def manifest(name: str, slice_name: str, image: str, command: list[str], num_slices: int = 1,
             max_restarts: int = 3, grace_s: int = 300, service_account: str = "default",
             data_bucket: str = "") -> dict:
    chip, chips = parse_slice(slice_name)
    if chip.name not in GKE_ACCELERATORS:
        raise ConfigError(f"{slice_name} is not a TPU slice GKE schedules")
    run_dir = named_in(command)
    if (run_dir is not None or command[:2] == ["maxgpt", "train"]) \
            and not (run_dir or "").startswith("gs://"):
        raise ConfigError("pods share no disk and lose their own when they end: give --run-dir "
                          "gs://BUCKET/PATH" + (f", not {run_dir}" if run_dir else
                                                " (train's default is local)"))
    per_host = min(chips, chip.chips_per_host)
    hosts = chips // per_host
    host_network = num_slices > 1  # DCN traffic between slices on the hosts' own NICs
    container = {
        "name": "maxgpt", "image": image, "command": command,
        "env": [{"name": "MAXGPT_DISTRIBUTED", "value": "auto"}],
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": per_host}},
    }
    spec = {
        "serviceAccountName": service_account,  # Workload Identity: the pods' bucket access
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[chip.name],
                         "cloud.google.com/gke-tpu-topology": topology(chip, chips)},
        "restartPolicy": "Never",
        **({"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"} if host_network else {}),
        "terminationGracePeriodSeconds": grace_s, "containers": [container]}
    pod = {"spec": spec}
    if data_bucket:
        spec["volumes"] = [data_volume(data_bucket, host_network)]
        container["volumeMounts"] = [{"name": "data", "mountPath": DATA, "readOnly": True}]
        pod = {"metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}}, "spec": spec}
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
    parser.add_argument("--service-account", default="default",
                        help="the pods' Kubernetes service account (Workload Identity), with "
                             "access to the run's and the data's buckets")
    parser.add_argument("--data-bucket", default="",
                        help=f"gs://BUCKET[/FOLDER] mounted read-only at {DATA} (gcsfuse)")
    parser.add_argument("--apply", action="store_true",
                        help="kubectl apply the manifest instead of printing it")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_slices < 1:
        parser.error("give --num-slices >= 1 and -- COMMAND")
    try:
        doc = manifest(args.name, args.slice, args.image, command, args.num_slices,
                       args.max_restarts, args.grace_seconds, args.service_account,
                       args.data_bucket)
    except ConfigError as e:
        print(f"launch/gke.py: error: {e}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(doc, sort_keys=False)
    if not args.apply:
        print(text, end="")
        return 0
    code = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode
    if code:
        print(f"launch/gke.py: kubectl apply exited {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
