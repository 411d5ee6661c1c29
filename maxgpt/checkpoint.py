"""Checkpoints of a run, written with orbax: `RUN_DIR/checkpoints/<step>/`.

Each step directory holds four orbax items, all readable with plain orbax:

    state/      the train state pytree: {"params": ..., "opt_state": ..., "step": int32}
                (StandardCheckpointHandler; restored straight into the mesh's shardings)
    data/       the data iterator's state, `process_<i>-of-<n>.json`, one per process
                (grain's orbax handler)
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
        tokenizer = ({} if tokenizer_proto is None else
                     {"sentencepiece_model_base64": base64.b64encode(tokenizer_proto).decode()})
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
            config=ocp.args.JsonSave(cfg.to_dict()),
            tokenizer=ocp.args.JsonSave(tokenizer)), force=True)

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """The train state, placed in `shardings`, and the data iterator state of `step`."""
        if step not in self.manager.all_steps():
            raise ConfigError(f"no checkpoint of step {step} in {self.directory}; it has "
                              f"{sorted(self.manager.all_steps()) or 'none'}")
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(_IteratorState())))
        return restored["state"], restored["data"].state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
