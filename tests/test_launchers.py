"""The cluster launchers: the exact commands, script and manifest of their dry runs, and real
runs against stand-in `gcloud`, `kubectl` and `sbatch` executables first on PATH.

The stand-in gcloud plays a 2-worker TPU slice: `ssh --worker=all` runs the remote shell line
with bash in each worker's own home under tmp_path (as sshd would), `scp` copies into those
homes, and it fails when any worker's line failed. The programs those lines call (python3, uv,
curl, and the maxgpt that the stand-in uv puts into the virtualenv) are stand-ins too. Every
stand-in appends one JSON line per call to $FAKE_CALLS; $FAKE_FAIL makes one exit 1 when its
arguments contain that text, and $FAKE_MAXGPT_FAIL makes that worker's maxgpt exit 3.
"""

import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import types

import pytest
import yaml

from maxgpt.chips import parse_slice, topology
from tests.conftest import REPO

TRAIN = ["maxgpt", "train", "--config", "configs/models/llama3-8b.yaml", "mesh.fsdp=-1"]

FAKE = r'''
import json, os, shutil, subprocess, sys, time
from pathlib import Path

prog, args = Path(sys.argv[0]).name, sys.argv[1:]
worker = os.environ.get("FAKE_WORKER")  # set inside a stand-in worker
homes = [Path(os.environ["FAKE_HOMES"]) / f"worker{i}"
         for i in range(int(os.environ["FAKE_WORKERS"]))]


def record(**extra):
    entry = {"prog": prog, "args": args, **extra}
    if worker is not None:
        entry |= {"worker": int(worker), "cwd": os.path.relpath(os.getcwd(), os.environ["HOME"])}
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def install(path):  # this stand-in, under another name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, path)


if prog == "curl":  # the TPU metadata server: this worker's number
    print(worker)
    sys.exit(0)
if prog == "maxgpt":
    record(distributed=os.environ.get("MAXGPT_DISTRIBUTED"))
    time.sleep(float(os.environ.get("FAKE_MAXGPT_SLEEP", "0")))
    print(f"maxgpt {' '.join(args)} on worker {worker}")
    sys.exit(3 if os.environ.get("FAKE_MAXGPT_FAIL") == worker else 0)
record(**({"stdin": sys.stdin.read()} if prog == "kubectl" else {}))
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in " ".join(args):
    print(f"{prog}: failing on cue", file=sys.stderr)
    sys.exit(1)
if prog == "gcloud" and args[3] == "scp":
    for home in homes:
        shutil.copy(args[4], home / args[5].split(":", 1)[1])
elif prog == "gcloud" and args[3] == "ssh":
    which = next(a for a in args if a.startswith("--worker=")).split("=", 1)[1]
    line = args[args.index("--command") + 1]
    codes = [subprocess.run(["bash", "-c", line], cwd=home,
                            env={**os.environ, "HOME": str(home), "FAKE_WORKER": str(i)}).returncode
             for i, home in enumerate(homes) if which in ("all", str(i))]
    sys.exit(1 if any(codes) else 0)  # as gcloud: fails if any worker's command failed
elif prog == "python3" and args[:3] == ["-m", "pip", "install"] and args[-1] == "uv":
    install(Path.home() / ".local/bin/uv")
elif prog == "uv" and args[0] == "venv":
    install(Path(args[-1]) / "bin" / "maxgpt")
elif prog == "sbatch":
    print("Submitted batch job 42")
'''


def launch(tool, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", tool), *args],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def tool(monkeypatch, capfd):
    """`tool(name, *args)`: launch/<name>'s main() in this process (a fresh interpreter per
    call would cost a second each: maxgpt imports jax), its children's output captured too."""
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")  # where tpu.py's `copy` puts its archive
    capfd.readouterr()

    def run(name, *args):
        try:
            code = load(name).main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
        out = capfd.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture
def fakes(tmp_path, monkeypatch, tool):
    """Stand-ins first on PATH and two worker homes."""
    bin_dir, homes = tmp_path / "bin", tmp_path / "workers"
    bin_dir.mkdir()
    for name in ("gcloud", "kubectl", "sbatch", "curl", "python3"):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{FAKE}")
        (bin_dir / name).chmod(0o755)
    for i in range(2):
        (homes / f"worker{i}").mkdir(parents=True)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"FAKE_CALLS": calls, "FAKE_HOMES": homes, "FAKE_WORKERS": 2}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def take_calls():
        entries = [json.loads(line) for line in calls.read_text().splitlines()] \
            if calls.exists() else []
        calls.unlink(missing_ok=True)
        return entries

    def give_venvs():  # what `install` leaves: the virtualenv's maxgpt
        for i in range(2):
            venv_bin = homes / f"worker{i}" / "maxgpt" / ".venv" / "bin"
            venv_bin.mkdir(parents=True)
            shutil.copy(bin_dir / "gcloud", venv_bin / "maxgpt")

    return types.SimpleNamespace(run=tool, calls=take_calls, homes=homes, tmp=tmp_path,
                                 give_venvs=give_venvs, setenv=monkeypatch.setenv)


@functools.cache
def load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name[:-3]}",
                                                  os.path.join(REPO, "launch", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What every remote line of launch/tpu.py is wrapped in: each worker's number from the TPU
# metadata, and its output lines labelled with it.
W = ("set -o pipefail; w=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google."
     "internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname); { ")
END = '; } 2>&1 | sed -u "s/^/[worker $w] /"'
REPORT = ('if [ -s ~/maxgpt.exit ]; then c=$(cat ~/maxgpt.exit); echo "exit $c"; exit "$c"; '
          'fi; if kill -0 "$(cat ~/maxgpt.pid 2>/dev/null)" 2>/dev/null; then echo running; '
          'exit 0; fi; echo "no job: no exit code in ~/maxgpt.exit and no process"; exit 1')
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", "--zone", "us-east5-a",
       "--worker=all", "--command"]
TPU = ["--name", "run1", "--zone", "us-east5-a", "--slice", "v5p-16"]  # 8 chips, 2 workers
RUN_DIR = ["--run-dir", "gs://bucket/runs/x"]


def test_slurm_script():
    out = launch("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "12:00:00", "--dry-run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "\n".join([
        "#!/bin/bash", "#SBATCH --job-name=maxgpt", "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00",
        "#SBATCH --output=%x-%j.out", "#SBATCH --signal=TERM@300", "#SBATCH --partition=gpu",
        "# --run-dir must be one directory that every node sees: a shared file system",
        "# (Lustre, GPFS, NFS) or gs://, not a node's local disk. maxgpt checks it at start.",
        "set -euo pipefail",
        "export MAXGPT_DISTRIBUTED=auto  # one JAX process per node, found through SLURM",
        "srun --kill-on-bad-exit=1 maxgpt train --config configs/models/llama3-8b.yaml "
        "mesh.fsdp=-1", ""])


def test_slurm_submits_with_sbatch(fakes):
    script = fakes.tmp / "job.sbatch"
    args = ["--nodes", "2", "--out", str(script), "--submit", "--", *TRAIN, *RUN_DIR]
    out = fakes.run("slurm.py", *args)
    assert out.returncode == 0, out.stderr
    assert "Submitted batch job 42" in out.stdout
    assert fakes.calls() == [{"prog": "sbatch", "args": [str(script)]}]
    dry = fakes.run("slurm.py", "--dry-run", *[a for a in args if a != "--submit"])
    assert script.read_text() == dry.stdout
    fakes.setenv("FAKE_FAIL", str(script))
    failed = fakes.run("slurm.py", *args)
    assert failed.returncode == 1 and "launch/slurm.py: sbatch exited 1" in failed.stderr


def test_tpu_pod_commands(tool):
    expected = {
        "create --spot": "gcloud compute tpus tpu-vm create run1 --zone us-east5-a "
                         "--accelerator-type v5p-16 --version v2-alpha-tpuv5 --spot",
        "copy": [["git", "-C", REPO, "archive", "--format=tar.gz", "-o",
                  "/tmp/maxgpt-run1.tar.gz", "HEAD"],
                 ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/maxgpt-run1.tar.gz",
                  "run1:maxgpt.tar.gz", "--zone", "us-east5-a", "--worker=all"],
                 [*SSH, f"{W}mkdir -p ~/maxgpt && tar xzf ~/maxgpt.tar.gz -C ~/maxgpt{END}"]],
        "install": [[*SSH, f"{W}cd ~/maxgpt && python3 -m pip install --user --quiet uv && "
                           "~/.local/bin/uv venv --allow-existing --python 3.12 ~/maxgpt/.venv "
                           "&& ~/.local/bin/uv pip install --python ~/maxgpt/.venv/bin/python "
                           f"-e '.[tpu]'{END}"]],
        "run": [[*SSH, f"{W}cd ~/maxgpt || exit 1; rm -f ~/maxgpt.exit; echo $$ > ~/maxgpt.pid"
                       "; MAXGPT_DISTRIBUTED=auto PYTHONUNBUFFERED=1 ~/maxgpt/.venv/bin/maxgpt "
                       "train --config configs/models/llama3-8b.yaml mesh.fsdp=-1 --run-dir "
                       "gs://bucket/runs/x 2>&1 | tee ~/maxgpt.log; c=${PIPESTATUS[0]}; "
                       f"echo $c > ~/maxgpt.exit; exit $c{END}"]],
        "run --detach": [[*SSH, f"{W}cd ~/maxgpt || exit 1; rm -f ~/maxgpt.exit ~/maxgpt.pid; "
                                "setsid nohup bash -c 'echo $$ > ~/maxgpt.pid; "
                                "MAXGPT_DISTRIBUTED=auto PYTHONUNBUFFERED=1 "
                                "~/maxgpt/.venv/bin/maxgpt train --config "
                                "configs/models/llama3-8b.yaml mesh.fsdp=-1 --run-dir "
                                "gs://bucket/runs/x > ~/maxgpt.log 2>&1; echo $? > "
                                "~/maxgpt.exit' > /dev/null 2>&1 < /dev/null & echo started"
                                f"{END}"]],
        "wait": [[*SSH, f"{W}while [ ! -s ~/maxgpt.exit ] && kill -0 \"$(cat ~/maxgpt.pid "
                        f"2>/dev/null)\" 2>/dev/null; do sleep 2; done; {REPORT}{END}"]],
        "status": [[*SSH, f"{W}{REPORT}{END}"]],
        "logs": [[*SSH, f"{W}tail -n 100 ~/maxgpt.log{END}"]],
        "logs --follow": [[*SSH, f"{W}tail -n 100 -f ~/maxgpt.log{END}"]],
        "delete": "gcloud compute tpus tpu-vm delete run1 --zone us-east5-a --quiet",
    }
    for action, want in expected.items():
        command = ["--", *TRAIN, *RUN_DIR] if action.startswith("run") else []
        out = tool("tpu.py", *TPU, "--dry-run", *action.split(), *command)
        assert out.returncode == 0, out.stderr
        lines = [shlex.join(cmd) for cmd in want] if isinstance(want, list) \
            else [want]
        assert out.stdout.splitlines() == lines, action
    after = tool("tpu.py", *TPU, "delete", "--dry-run")  # --dry-run after the action too
    assert after.stdout.strip() == expected["delete"]


def test_tpu_refuses_bad_input(tool):
    script = launch("tpu.py", "--name", "x", "--zone", "z", "--slice", "v9-8", "create")
    assert script.returncode == 2 and script.stderr == (
        "launch/tpu.py: error: unknown accelerator slice 'v9-8'; write NAME-COUNT with NAME one "
        "of v4, v5e, v5p, v6e, h200, h100, a100, v5litepod, e.g. v5p-256 or v6e-64\n")

    def refused(*args):
        out = tool("tpu.py", "--name", "x", "--zone", "z", "--dry-run", *args)
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert out.stderr.startswith("launch/tpu.py: error: ") and out.stderr.count("\n") == 1
        return out.stderr

    assert "unknown accelerator slice 'v9-8'" in refused("--slice", "v9-8", "create")
    # several TPU VMs share no disk: a local run dir, or none (train's default is local)
    assert "--run-dir gs://BUCKET/PATH, not /shared/x" in refused(
        "--slice", "v5p-16", "run", "--", "maxgpt", "train", "--run-dir", "/shared/x")
    assert "train's default is local" in refused("--slice", "v6e-16", "run", "--", *TRAIN)
    assert "not bash" in refused("--slice", "v5p-8", "run", "--", "bash", "-c", "ls")
    assert "run needs -- COMMAND" in refused("--slice", "v5p-8", "run")
    # one TPU VM (v5p-8: 4 chips, v6e-8: 8) may keep its run on its own disk
    for name in ("v5p-8", "v6e-8"):
        one = tool("tpu.py", "--name", "x", "--zone", "z", "--slice", name, "--dry-run",
                     "run", "--", "maxgpt", "train", "--run-dir", "runs/x")
        assert one.returncode == 0 and "maxgpt train --run-dir runs/x 2>&1" in one.stdout


def test_tpu_launcher_runs_each_step_on_every_worker(fakes):
    assert fakes.run("tpu.py", *TPU, "create", "--spot").returncode == 0
    assert fakes.calls() == [{"prog": "gcloud", "args": [
        "compute", "tpus", "tpu-vm", "create", "run1", "--zone", "us-east5-a",
        "--accelerator-type", "v5p-16", "--version", "v2-alpha-tpuv5", "--spot"]}]

    out = fakes.run("tpu.py", *TPU, "copy")  # git archive for real, into tmp_path
    assert out.returncode == 0, out.stderr
    archive = str(fakes.tmp / "maxgpt-run1.tar.gz")
    calls = fakes.calls()
    assert [c["args"][:5] for c in calls] == [["compute", "tpus", "tpu-vm", "scp", archive],
                                              ["compute", "tpus", "tpu-vm", "ssh", "run1"]]
    for i in range(2):
        assert (fakes.homes / f"worker{i}" / "maxgpt" / "launch" / "tpu.py").is_file()

    out = fakes.run("tpu.py", *TPU, "install")
    assert out.returncode == 0, out.stderr
    steps = [(c["prog"], c.get("worker"), c.get("cwd"), c["args"]) for c in fakes.calls()]
    assert steps[0][:2] == ("gcloud", None) and steps[0][3][-3:-1] == ["--worker=all",
                                                                      "--command"]
    venv = [str(fakes.homes / f"worker{i}" / "maxgpt" / ".venv") for i in range(2)]
    assert steps[1:] == [step for i in range(2) for step in [
        ("python3", i, "maxgpt", ["-m", "pip", "install", "--user", "--quiet", "uv"]),
        ("uv", i, "maxgpt", ["venv", "--allow-existing", "--python", "3.12", venv[i]]),
        ("uv", i, "maxgpt", ["pip", "install", "--python", f"{venv[i]}/bin/python", "-e",
                             ".[tpu]"])]]

    out = fakes.run("tpu.py", *TPU, "run", "--", *TRAIN, *RUN_DIR)
    assert out.returncode == 0, out.stderr
    args = [*TRAIN[1:], *RUN_DIR]
    assert [(c["prog"], c.get("worker"), c.get("cwd"), c["args"], c.get("distributed"))
            for c in fakes.calls()][1:] == [("maxgpt", i, "maxgpt", args, "auto")
                                            for i in range(2)]
    for i in range(2):
        said = f"maxgpt {' '.join(args)} on worker {i}"
        assert f"[worker {i}] {said}" in out.stdout.splitlines()
        home = fakes.homes / f"worker{i}"
        assert (home / "maxgpt.log").read_text() == said + "\n"
        assert (home / "maxgpt.exit").read_text() == "0\n"

    out = fakes.run("tpu.py", *TPU, "logs")
    assert out.returncode == 0, out.stderr
    assert [c["args"][7] for c in fakes.calls()] == ["--worker=all"]
    assert sorted(out.stdout.splitlines()) == [
        f"[worker {i}] maxgpt {' '.join(args)} on worker {i}" for i in range(2)]

    assert fakes.run("tpu.py", *TPU, "delete").returncode == 0
    assert [c["args"][3] for c in fakes.calls()] == ["delete"]


def test_tpu_run_fails_when_a_worker_fails(fakes):
    status = fakes.run("tpu.py", *TPU, "status")  # nothing ran yet
    assert status.returncode == 1 and "[worker 1] no job" in status.stdout
    fakes.calls()
    fakes.give_venvs()
    fakes.setenv("FAKE_MAXGPT_FAIL", "1")
    out = fakes.run("tpu.py", *TPU, "run", "--", *TRAIN, *RUN_DIR)
    assert out.returncode != 0 and "launch/tpu.py: run failed: gcloud exited 1" in out.stderr
    assert "[worker 1] maxgpt train" in out.stdout  # the failing worker's output is shown
    assert [(c["prog"], c.get("worker")) for c in fakes.calls()] == [
        ("gcloud", None), ("maxgpt", 0), ("maxgpt", 1)]  # the others ran to their end
    exits = [(fakes.homes / f"worker{i}" / "maxgpt.exit").read_text() for i in range(2)]
    assert exits == ["0\n", "3\n"]  # maxgpt's own exit code, through tee
    status = fakes.run("tpu.py", *TPU, "status")
    assert status.returncode == 1
    assert sorted(status.stdout.splitlines()) == ["[worker 0] exit 0", "[worker 1] exit 3"]
    fakes.calls()

    fakes.setenv("FAKE_FAIL", "scp")  # a failed step stops the steps after it
    out = fakes.run("tpu.py", *TPU, "copy")
    assert out.returncode == 1 and [c["args"][3] for c in fakes.calls()] == ["scp"]


def test_tpu_detached_run_then_wait(fakes):
    fakes.give_venvs()
    fakes.setenv("FAKE_MAXGPT_SLEEP", "2")
    fakes.setenv("FAKE_MAXGPT_FAIL", "0")
    out = fakes.run("tpu.py", *TPU, "run", "--detach", "--", *TRAIN, *RUN_DIR)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["[worker 0] started", "[worker 1] started"]
    assert not any((fakes.homes / f"worker{i}" / "maxgpt.exit").exists() for i in range(2))
    out = fakes.run("tpu.py", *TPU, "status")  # maxgpt sleeps 2 s
    assert out.returncode == 0
    assert sorted(out.stdout.splitlines()) == ["[worker 0] running", "[worker 1] running"]

    out = fakes.run("tpu.py", *TPU, "wait")  # until both have ended; worker 0 failed
    assert out.returncode == 1
    assert sorted(out.stdout.splitlines()) == ["[worker 0] exit 3", "[worker 1] exit 0"]
    assert sorted((c["prog"], c.get("worker", -1)) for c in fakes.calls()) == [
        ("gcloud", -1), ("gcloud", -1), ("gcloud", -1), ("maxgpt", 0), ("maxgpt", 1)]
    out = fakes.run("tpu.py", *TPU, "logs")
    assert sorted(out.stdout.splitlines()) == [
        f"[worker {i}] maxgpt {' '.join([*TRAIN[1:], *RUN_DIR])} on worker {i}"
        for i in range(2)]


def test_gke_jobset_manifest(tool):
    out = tool("gke.py", "--name", "run1", "--slice", "v5p-256", "--image", "img:1",
                 "--num-slices", "2", "--service-account", "trainer",
                 "--data-bucket", "gs://corpus/tokenized/", "--", *TRAIN, *RUN_DIR)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "run1"
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2  # one replicated job per slice
    assert job["template"]["spec"]["parallelism"] == 32  # 128 chips, 4 per host
    template = job["template"]["spec"]["template"]
    assert template["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    pod = template["spec"]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["hostNetwork"] is True  # multi-slice: DCN on the hosts' NICs
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x8"}
    assert pod["volumes"] == [{"name": "data", "csi": {
        "driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
        "volumeAttributes": {"bucketName": "corpus",
                             "mountOptions": "implicit-dirs,only-dir=tokenized",
                             "hostNetworkPodKSA": "true"}}}]
    container = pod["containers"][0]
    assert container["command"] == [*TRAIN, *RUN_DIR] and container["image"] == "img:1"
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data",
                                          "readOnly": True}]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert {"name": "MAXGPT_DISTRIBUTED", "value": "auto"} in container["env"]

    one = tool("gke.py", "--name", "run1", "--slice", "v5p-16", "--image", "img:1",
                 "--", *TRAIN, *RUN_DIR)
    template = yaml.safe_load(one.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]
    assert "metadata" not in template and "volumes" not in template["spec"]
    # one slice: the pod network, where Workload Identity covers maxgpt's own gs:// I/O
    assert template["spec"]["serviceAccountName"] == "default"
    assert "hostNetwork" not in template["spec"]


def test_gke_refuses_a_local_run_dir(tool):
    for run_dir in (["--run-dir", "/tmp/x"], []):
        out = tool("gke.py", "--name", "r", "--slice", "v5p-8", "--image", "i", "--",
                     *TRAIN, *run_dir)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.startswith("launch/gke.py: error: pods share no disk")
    bad = tool("gke.py", "--name", "r", "--slice", "v5p-8", "--image", "i",
                 "--data-bucket", "corpus", "--", *TRAIN, *RUN_DIR)
    assert bad.returncode == 2 and "write gs://BUCKET" in bad.stderr


def test_gke_applies_with_kubectl(fakes):
    args = ["--name", "run1", "--slice", "v5p-16", "--image", "img:1", "--", *TRAIN, *RUN_DIR]
    printed = fakes.run("gke.py", *args).stdout
    out = fakes.run("gke.py", "--apply", *args)
    assert out.returncode == 0, out.stderr
    assert fakes.calls() == [{"prog": "kubectl", "args": ["apply", "-f", "-"],
                              "stdin": printed}]
    fakes.setenv("FAKE_FAIL", "apply")
    failed = fakes.run("gke.py", "--apply", *args)
    assert failed.returncode == 1 and "launch/gke.py: kubectl apply exited 1" in failed.stderr


@pytest.mark.parametrize("name, shape", [
    ("v5p-8", "2x2x1"), ("v5p-16", "2x2x2"), ("v5p-128", "4x4x4"), ("v5p-256", "4x4x8"),
    ("v4-32", "2x2x4"), ("v5e-16", "4x4"), ("v6e-8", "2x4"), ("v6e-256", "16x16")])
def test_slice_topologies_as_gke_names_them(name, shape):
    assert topology(*parse_slice(name)) == shape
