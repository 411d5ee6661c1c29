"""The cluster launchers' dry runs: the exact commands, script and manifest they produce."""

import os
import subprocess
import sys

import pytest
import yaml

from maxgpt.chips import parse_slice, topology
from tests.conftest import REPO

TRAIN = ["maxgpt", "train", "--config", "configs/models/llama3-8b.yaml", "mesh.fsdp=-1"]


def launch(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", tool), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_slurm_script():
    out = launch("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "12:00:00", "--dry-run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "\n".join([
        "#!/bin/bash", "#SBATCH --job-name=maxgpt", "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00",
        "#SBATCH --output=%x-%j.out", "#SBATCH --signal=TERM@300", "#SBATCH --partition=gpu",
        "set -euo pipefail",
        "export MAXGPT_DISTRIBUTED=auto  # one JAX process per node, found through SLURM",
        "srun --kill-on-bad-exit=1 maxgpt train --config configs/models/llama3-8b.yaml "
        "mesh.fsdp=-1", ""])


def test_tpu_pod_commands():
    common = ["--name", "run1", "--zone", "us-east5-a", "--slice", "v5p-256", "--dry-run"]
    expected = {
        "create": "gcloud compute tpus tpu-vm create run1 --zone us-east5-a --accelerator-type "
                  "v5p-256 --version v2-alpha-tpuv5 --spot",
        "copy": f"git -C {REPO} archive --format=tar.gz -o /tmp/maxgpt-run1.tar.gz HEAD\n"
                "gcloud compute tpus tpu-vm scp /tmp/maxgpt-run1.tar.gz run1:maxgpt.tar.gz "
                "--zone us-east5-a --worker=all\n"
                "gcloud compute tpus tpu-vm ssh run1 --zone us-east5-a --worker=all --command "
                "'mkdir -p ~/maxgpt && tar xzf ~/maxgpt.tar.gz -C ~/maxgpt'",
        "install": "gcloud compute tpus tpu-vm ssh run1 --zone us-east5-a --worker=all "
                   "--command 'cd ~/maxgpt && python3 -m pip install -e '\"'\"'.[tpu]'\"'\"''",
        "run": "gcloud compute tpus tpu-vm ssh run1 --zone us-east5-a --worker=all --command "
               "'cd ~/maxgpt && MAXGPT_DISTRIBUTED=auto nohup maxgpt train --config "
               "configs/models/llama3-8b.yaml mesh.fsdp=-1 > ~/maxgpt.log 2>&1 &'",
        "logs": "gcloud compute tpus tpu-vm ssh run1 --zone us-east5-a --worker=0 --command "
                "'tail -n 100 -f ~/maxgpt.log'",
        "delete": "gcloud compute tpus tpu-vm delete run1 --zone us-east5-a --quiet",
    }
    for action, line in expected.items():
        extra = ["--spot"] if action == "create" else []
        out = launch("tpu.py", *common, *extra, action, *(["--", *TRAIN] if action == "run"
                                                          else []))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == line, action
    bad = launch("tpu.py", "--name", "x", "--zone", "z", "--slice", "v9-8", "--dry-run", "create")
    assert bad.returncode == 2 and "unknown accelerator slice 'v9-8'" in bad.stderr


def test_gke_jobset_manifest():
    out = launch("gke.py", "--name", "run1", "--slice", "v5p-256", "--image", "img:1",
                 "--num-slices", "2", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "run1"
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2  # one replicated job per slice
    assert job["template"]["spec"]["parallelism"] == 32  # 128 chips, 4 per host
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x8"}
    container = pod["containers"][0]
    assert container["command"] == TRAIN and container["image"] == "img:1"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert {"name": "MAXGPT_DISTRIBUTED", "value": "auto"} in container["env"]


@pytest.mark.parametrize("name, shape", [
    ("v5p-8", "2x2x1"), ("v5p-16", "2x2x2"), ("v5p-128", "4x4x4"), ("v5p-256", "4x4x8"),
    ("v4-32", "2x2x4"), ("v5e-16", "4x4"), ("v6e-8", "2x4"), ("v6e-256", "16x16")])
def test_slice_topologies_as_gke_names_them(name, shape):
    assert topology(*parse_slice(name)) == shape
