"""Experiment trackers beside TensorBoard: Weights & Biases (`metrics.wandb_project`).

Process 0 logs every row MetricsWriter writes, under the same names as TensorBoard
(`train/loss`, `eval/loss`, ...), against a `step` metric of its own rather than W&B's
internal step counter: a resumed run logs the steps after its checkpoint again, and W&B
drops rows whose internal step goes backwards.

The W&B run id is derived from the run dir, so the same command run again (a restart)
continues the same W&B run. Offline mode writes the run's files under RUN_DIR/wandb (a
local run dir) or ./wandb (a bucket one: W&B writes local files), to upload later with
`wandb sync`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

from maxgpt.config import Config, ConfigError
from maxgpt.run_dir import RunDir
from maxgpt.storage import is_remote


def scalar_name(key: str) -> str:
    """A metrics row's key as TensorBoard and W&B show it."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def run_id(run_dir: RunDir) -> str:
    return hashlib.sha256(os.fspath(run_dir.path).encode()).hexdigest()[:16]


def check_tracker(cfg: Config, run_dir: RunDir | None) -> None:
    """Refuse, before anything is compiled or written, a tracker that cannot be opened."""
    if not cfg.metrics.wandb_project:
        return
    if run_dir is None:
        raise ConfigError("metrics.wandb_project needs a run dir (--run-dir)")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("metrics.wandb_project needs wandb: pip install -e '.[wandb]' "
                          "(or set metrics.wandb_project=\"\")")


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: RunDir):
        import wandb

        m = cfg.metrics
        local = not is_remote(run_dir.path)
        directory = os.fspath(run_dir.path) if local else os.getcwd()
        os.makedirs(os.path.join(directory, "wandb"), exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=m.wandb_project, name=m.wandb_name or run_dir.path.name, id=run_id(run_dir),
            resume="allow", mode=m.wandb_mode, dir=directory, config=cfg.to_dict(),
            settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.where = self.run.dir

    def log(self, row: dict[str, Any]) -> None:
        values = {scalar_name(k): v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({"step": row["step"], **values})

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: Config, run_dir: RunDir | None) -> WandbTracker | None:
    """The tracker `cfg.metrics` asks for (None: none); only process 0 calls this."""
    check_tracker(cfg, run_dir)
    return WandbTracker(cfg, run_dir) if cfg.metrics.wandb_project else None
