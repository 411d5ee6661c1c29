"""Starting maxgpt as one process of a multi-process (multi-host) JAX program.

maxgpt is a multi-controller JAX program: every host runs the same command, and
`jax.distributed.initialize` joins them before any device is touched. Which processes
belong together comes from, in order:

1. explicit variables, set by `launch/local.py` or by hand on any cluster:
   `MAXGPT_COORDINATOR` (host:port of process 0), `MAXGPT_NUM_PROCESSES`, `MAXGPT_PROCESS_ID`;
2. the cluster itself, detected by JAX: SLURM (`srun`, more than one task), Cloud TPU VMs and
   GKE TPU node pools (several workers), Kubernetes JobSets. Set `MAXGPT_DISTRIBUTED=auto` to
   insist on detection, `MAXGPT_DISTRIBUTED=off` to run single-process regardless.

On CPU the processes exchange collectives over gloo (JAX's default), so the whole
multi-process path runs on one machine: `launch/local.py --processes 2 --devices-per-process 4`.
"""

from __future__ import annotations

import os

from maxgpt.config import ConfigError

_started = False


def _cluster_detected(env) -> bool:
    slurm = env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1
    tpu_hosts = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    return bool(slurm or tpu_hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS")
                or env.get("JOBSET_NAME"))


def initialize(env=None) -> bool:
    """Join the other processes of this job, if there are any; True when multi-process.
    Call before anything touches a JAX backend (the CLI does, for every command)."""
    global _started
    env = os.environ if env is None else env
    mode = env.get("MAXGPT_DISTRIBUTED", "")
    if _started or mode == "off":
        return _started
    import jax

    if env.get("MAXGPT_COORDINATOR"):
        try:
            count, index = int(env["MAXGPT_NUM_PROCESSES"]), int(env["MAXGPT_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ConfigError("MAXGPT_COORDINATOR needs MAXGPT_NUM_PROCESSES and "
                              "MAXGPT_PROCESS_ID (integers)") from None
        if not 0 <= index < count:
            raise ConfigError(f"MAXGPT_PROCESS_ID={index} is not in [0, {count})")
        jax.distributed.initialize(env["MAXGPT_COORDINATOR"], count, index)
    elif mode == "auto" or _cluster_detected(env):
        jax.distributed.initialize()  # JAX's own cluster detection
    elif mode:
        raise ConfigError(f"MAXGPT_DISTRIBUTED must be auto or off, got {mode!r}")
    else:
        return False
    _started = True
    return True


# Small host-side agreements between the processes of a job, outside the train step: the
# run directory's probe (maxgpt/run_dir.py), the tokenizer fingerprint, a timed save. Each is
# one tiny collective; with one process they cost nothing.
_TEXT_BYTES = 1024


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_leader() -> bool:
    """True on process 0, the one that writes a run's files that are not per-process."""
    return process_index() == 0


def _encode(text: str):
    import numpy as np

    data = text.encode()[:_TEXT_BYTES]
    return np.frombuffer(data.ljust(_TEXT_BYTES, b"\0"), np.uint8)


def _decode(row) -> str:
    return bytes(row).rstrip(b"\0").decode(errors="replace")


def gather_text(text: str) -> list[str]:
    """Every process's `text` (up to 1 KiB each), in process order, on every process."""
    if process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    return [_decode(row) for row in multihost_utils.process_allgather(_encode(text))]


def broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process."""
    if process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    return _decode(multihost_utils.broadcast_one_to_all(_encode(text)))


def barrier(name: str) -> None:
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
