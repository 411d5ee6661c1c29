"""Checkpoints of a run, written with orbax: `RUN_DIR/checkpoints/<step>/`.

Each step directory holds four orbax items, all readable with plain orbax:

    state/      the train state pytree: {"params": ..., "opt_state": ..., "step": int32}
                (StandardCheckpointHandler; restored straight into the mesh's shardings)
    data/       `process_<i>-of-<n>.json`, one per process (grain's orbax handler):
                {"pipeline": the data settings it is valid for, "iterator": grain's state}
    config/     the resolved run config (JSON)
    tokenizer/  {"sentencepiece_model_base64": ...} (JSON), or {} for synthetic data

orbax writes a step under a temporary name and renames it when complete, so a step
directory that exists is whole; saves are asynchronous (the loop goes on while arrays are
written) and `close()` waits for the last one.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from maxgpt.config import Config, ConfigError

ITEMS = ("state", "data", "config", "tokenizer")


class _IteratorState:
    """The iterator state as grain's orbax handler expects an iterator to hand it over:
    JSON bytes from get_state(). Captured when the save is asked for, not when the
    background write runs, so the saved state matches the saved step exactly."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:  # called by the handler after a restore
        pass


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=ITEMS,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "tokenizer": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, cfg: Config,
             tokenizer_proto: bytes | None) -> None:
        """Start saving `step`. Returns once the arrays are copied off the devices (orbax
        does that before its background write), so the caller may donate `state` next."""
        tokenizer = ({} if tokenizer_proto is None else
                     {"sentencepiece_model_base64": base64.b64encode(tokenizer_proto).decode()})
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
            config=ocp.args.JsonSave(cfg.to_dict()),
            tokenizer=ocp.args.JsonSave(tokenizer)), force=True)

    def restore(self, step: int, abstract_state: Any, shardings: Any,
                data: bool = True) -> tuple[Any, dict | None]:
        """The train state of `step`, placed in `shardings`, and (if `data`) the saved data
        iterator state of this process."""
        if step not in self.manager.all_steps():
            raise ConfigError(f"no checkpoint of step {step} in {self.directory}; it has "
                              f"{sorted(self.manager.all_steps()) or 'none'}")
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_state, shardings)
        items = {"state": ocp.args.StandardRestore(target)}
        if data:
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorState())
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if "process_" in str(e):  # grain: no iterator file for this process index/count
                raise ConfigError(
                    f"checkpoint {step} in {self.directory} was written by a different number "
                    f"of processes than this run's {jax.process_count()}; its data position "
                    "cannot be resumed") from None
            raise
        return restored["state"], restored["data"].state if data else None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
