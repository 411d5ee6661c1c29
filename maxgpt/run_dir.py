"""The run directory: the one place that knows a run's layout and how a run continues.

    RUN/config.yaml        the resolved config (written once the start or resume is accepted)
    RUN/tokenizer.model    the tokenizer the run reads with
    RUN/metrics.jsonl      one JSON row per logged step (maxgpt/metrics.py)
    RUN/tensorboard/       event files
    RUN/checkpoints/       orbax step directories (maxgpt/checkpoint.py)
    RUN/profile/           jax.profiler traces (train.profile_steps)
    RUN/eval/              lm-eval task results, tasks-step-<N>.json (maxgpt/harness.py)
    RUN/quantized/         low-bit weights of a checkpoint, step-<N>-<int8|int4>-g<G>/
                           (`--quantize` of generate/eval, maxgpt/inference.py)
    RUN/owner.json         the training job that owns the run while it runs (maxgpt/owner.py)
    RUN/.maxgpt-probes/    where each start proves every process shares RUN (left empty)

RUN may be a local path or a URI (`gs://bucket/runs/x`, maxgpt/storage.py). Every process
of a job must see the same RUN: `check_shared` proves it before anything is written.

A run continues when the same command is run again (a launcher's restart, an sbatch
resubmit): `continue_with` accepts a config that equals the stored one except for the keys
in RESUMABLE, and refuses anything else naming the first key that differs.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

import yaml

from maxgpt import distributed
from maxgpt.config import Config, ConfigError, load_config, valid_keys
from maxgpt.storage import PathLike, as_path, one_line, write_atomic

# Keys a continuing run may change: how long it runs, how often it logs, evaluates and
# saves, and how it is laid out on the devices (checkpoints restore on any mesh). Everything
# else (the model, the optimizer and its schedule, the data) defines the run. Remat, the
# attention kernel, layer unrolling, microbatches and the loss chunk change memory and speed,
# not the numbers (to float rounding).
RESUMABLE_SECTIONS = ("mesh", "checkpoint", "eval", "metrics")
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_steps",
             "train.max_bad_steps", "train.profile_steps", "train.microbatches",
             "train.loss_chunk", "model.remat", "model.attention", "model.unroll_layers")


def resumable(key: str) -> bool:
    return key in RESUMABLE or key.split(".")[0] in RESUMABLE_SECTIONS


def named_in(command: list[str]) -> str | None:
    """The --run-dir a maxgpt command line names, if any (for launchers' checks)."""
    for i, arg in enumerate(command):
        if arg == "--run-dir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return None


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


class RunDir:
    """A run's directory (local or a URI) and the paths of everything in it."""

    def __init__(self, path: "PathLike | RunDir"):
        self.path = path.path if isinstance(path, RunDir) else as_path(path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    @property
    def config_file(self):
        return self.path / "config.yaml"

    @property
    def tokenizer_file(self):
        return self.path / "tokenizer.model"

    @property
    def metrics_file(self):
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self):
        return self.path / "tensorboard"

    @property
    def checkpoints(self):
        return self.path / "checkpoints"

    @property
    def profile(self):
        return self.path / "profile"

    def quantized(self, step: int, kind: str, group: int):
        """The weights of checkpoint `step` quantized to `kind` in groups of `group` inputs
        (0: per output channel), saved by the first `--quantize` use and read after."""
        return self.path / "quantized" / f"step-{step}-{kind}-g{group}"

    def task_results(self, step: int):
        """lm-eval task results of checkpoint (or training) step `step`."""
        return self.path / "eval" / f"tasks-step-{step}.json"

    @property
    def owner_file(self):
        return self.path / "owner.json"

    def holds_run(self) -> bool:
        return self.config_file.is_file()

    def require_run(self) -> "RunDir":
        """Self, if it holds a run; else the user's error."""
        if not self.holds_run():
            raise ConfigError(f"{self} is not a run directory (no config.yaml)")
        return self

    def load_config(self, overrides=()) -> Config:
        return load_config(self.config_file, overrides)

    def continue_with(self, cfg: Config) -> Config:
        """The config to run with: `cfg` for a new run; for an existing one, `cfg` if it
        differs from the stored config only in RESUMABLE keys (data.streams=0, "one per row
        share", means the stored number), else the user's error naming the first key."""
        if not self.holds_run():
            return cfg
        stored = self.load_config()
        if cfg.data.streams == 0:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, streams=stored.data.streams))
        old, new = _flat(stored), _flat(cfg)
        for key in valid_keys():
            if old[key] != new[key] and not resumable(key):
                raise ConfigError(
                    f"{self} holds a run with {key}={old[key]!r}, this command asks for "
                    f"{key}={new[key]!r}; a continuing run may change only train.steps, "
                    "logging, evaluation and checkpoint cadence, the mesh and memory "
                    "settings (docs/checkpoints.md); use a new --run-dir (nothing was "
                    "changed)")
        return cfg

    def write(self, cfg: Config, tokenizer_proto: bytes | None) -> None:
        """config.yaml and the run's tokenizer.model (process 0), each replaced atomically,
        so that a run directory is self-contained."""
        if not distributed.is_leader():
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.config_file, yaml.safe_dump(cfg.to_dict(),
                                                          sort_keys=False).encode())
            if tokenizer_proto is not None and not (
                    self.tokenizer_file.is_file()
                    and self.tokenizer_file.read_bytes() == tokenizer_proto):
                write_atomic(self.tokenizer_file, tokenizer_proto)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {self}: {one_line(e)}") from None

    def check_shared(self) -> None:
        """Every process writes a probe file into RUN, then checks that it sees every
        other process's: one clear error on every process (naming the host that cannot see
        or cannot write) when RUN is not one storage for the whole job, never a hang."""
        count, index = distributed.process_count(), distributed.process_index()
        token = distributed.broadcast_text(uuid.uuid4().hex[:12])  # process 0's, for all
        probes = self.path / ".maxgpt-probes"
        host = socket.gethostname()
        error = ""
        try:
            probes.mkdir(parents=True, exist_ok=True)
            (probes / f"{token}-{index}").write_text(host)
        except Exception as e:  # OSError, or whatever a storage client raises
            error = f"cannot write the run directory {self}: {one_line(e)}"
        distributed.barrier("maxgpt-run-dir-probes-written")
        seen = ["1" if (probes / f"{token}-{i}").exists() else "0" for i in range(count)]
        rows = distributed.gather_text("".join(seen))
        hosts = distributed.gather_text(host)
        errors = distributed.gather_text(error)
        try:
            (probes / f"{token}-{index}").unlink()
        except Exception:  # a probe left behind is harmless
            pass
        for i, (row, err) in enumerate(zip(rows, errors)):
            if err:
                raise ConfigError(f"process {i} on {hosts[i]}: {err} (nothing was changed)")
            if "0" in row:
                j = row.index("0")
                raise ConfigError(
                    f"process {i} on {hosts[i]} does not see the files process {j} on "
                    f"{hosts[j]} writes in the run directory {self}: every process of a job "
                    "needs the same run directory (gs://... or a shared file system; "
                    "docs/launch.md) (nothing was changed)")
