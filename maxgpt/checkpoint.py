"""Checkpoints of a run, written with orbax: `RUN_DIR/checkpoints/<step>/`.

Each step directory holds four orbax items, all readable with plain orbax (docs/checkpoints.md):

    state/      the train state pytree {"params", "opt_state", "step", "skipped_steps",
                "bad_in_a_row"} (StandardCheckpointHandler; restored straight into the
                shardings of whatever mesh the reader has)
    data/       `process_<i>-of-<n>.json`, one per process (grain's file layout):
                {"pipeline": the data settings it is valid for, "iterator": {"streams":
                {"<s>": grain's state of stream s}} for the data streams that process read}.
                A restore reads every process's file and merges the streams, so a run
                resumes on any number of processes (data/pipeline.py)
    config/     the resolved run config (JSON)
    tokenizer/  {"sentencepiece_model_base64": ...} (JSON), or {} for synthetic data

There is no RNG state to save: every random draw derives from (train.seed, step).

Safety:
- orbax writes a step under a temporary name and renames it when complete, so a step
  directory that exists was written whole; leftovers of a killed save are temporary
  directories, which orbax ignores and removes when the manager next opens the directory.
- Saves are asynchronous: `save` returns once the arrays are copied off the devices, the
  files are written in the background, and the next save (or `close`) waits for it.
- A step that exists but cannot be read (a disk error, a hand-edited file) is reported and
  the previous step is used; once one restores, the unreadable newer ones are moved aside to
  `<step>.unreadable-<time>` (kept for inspection, never deleted). If none is readable the
  run stops, moving nothing, rather than start over silently.
- Nothing is unpickled: arrays come from tensorstore, the rest from JSON.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sys
import time
from typing import Any

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from maxgpt import layouts, sharding

from maxgpt.config import CheckpointConfig, Config, ConfigError
from maxgpt.run_dir import RunDir
from maxgpt.storage import PathLike, absolute, as_path, one_line

ITEMS = ("state", "data", "config", "tokenizer")


class _IteratorState:
    """The iterator state as grain's orbax handler expects an iterator to hand it over:
    JSON bytes from get_state(). Captured when the save is asked for, not when the
    background write runs, so the saved state matches the saved step exactly."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def merge(self, states: list[dict]) -> "_IteratorState":
        """One state from every process's: their (equal) pipeline settings, and all their
        streams' iterator states (data/pipeline.py); a synthetic source's state is the
        same step everywhere."""
        streams = {k: v for state in states
                   for k, v in state["iterator"].get("streams", {}).items()}
        self.state = dict(states[0], **({"iterator": {"streams": streams}} if streams else {}))
        return self


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (one JSON file per process), restoring the union of all the files:
    the streams a process reads now may have been read by another process, or by several,
    before (their copies are identical)."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        files = sorted(directory.glob("process_*-of-*.json"))
        if not files:
            raise ValueError(f"no process_*-of-*.json data state in {directory}")
        return item.merge([json.loads(f.read_text()) for f in files])


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: _IteratorState


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: _IteratorState


class _StorageNoise(logging.Filter):
    """Drops orbax's own error logs (tracebacks from its background threads, pages of them
    for one failed save) and asyncio's "exception was never retrieved" for the writes of a
    failed save still in flight: maxgpt reports those failures itself, in one line. Also
    the warnings a read-only manager (eval, generate, export) logs on every start, which
    read like a permission problem."""

    READ_ONLY_NOTES = ("Given directory is read only",
                       "CheckpointManagerOptions.read_only=True")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return "exception was never retrieved" not in str(record.msg)
        if "orbax" in record.pathname and str(record.msg).startswith(self.READ_ONLY_NOTES):
            return False
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_STORAGE_NOISE = _StorageNoise()


def _quiet_storage_noise() -> None:
    """Install the filter above (once: loggers keep a set of filters), and drop what the
    writes of a failed save print as they finish into the event loop orbax has closed: a
    traceback each ("Event loop is closed") through sys.unraisablehook, dozens of them,
    through the middle of maxgpt's one line. Anything else goes to the hook as before."""
    logging.getLogger("absl").addFilter(_STORAGE_NOISE)
    logging.getLogger("asyncio").addFilter(_STORAGE_NOISE)
    hook = sys.unraisablehook
    if getattr(hook, "maxgpt", False):
        return

    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)

    quiet.maxgpt = True
    sys.unraisablehook = quiet


class SaveFailed(ConfigError):
    """A checkpoint could not be written (full disk, lost permissions, a bucket gone): the
    run stops with exit code 2; the checkpoints before it are intact."""


class Checkpointer:
    def __init__(self, run_dir: RunDir, cfg: CheckpointConfig | None = None,
                 read_only: bool = False):
        self.directory = absolute(run_dir.checkpoints)
        self.pending: int | None = None  # the step of the newest save asked for
        _quiet_storage_noise()
        keep = None if cfg is None else cfg.keep
        keep_every = None if cfg is None or cfg.keep_every == 0 else cfg.keep_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every, create=not read_only,
                read_only=read_only, cleanup_tmp_directories=not read_only,
                # Directories made inside save(): made in the background, a failure to make
                # them (lost permissions) leaves save() waiting 20 minutes for their signal.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
            item_names=ITEMS,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": _DataHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "tokenizer": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, cfg: Config,
             tokenizer_proto: bytes | None) -> None:
        """Start saving `step`. Returns once the arrays are copied off the devices (orbax
        does that before its background write), so the caller may donate `state` next."""
        tokenizer = ({} if tokenizer_proto is None else
                     {"sentencepiece_model_base64": base64.b64encode(tokenizer_proto).decode()})
        try:  # orbax waits for the previous save anyway: its failure is reported as its own
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None
        self.pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=_DataSave(_IteratorState(data_state)),
                config=ocp.args.JsonSave(cfg.to_dict()),
                tokenizer=ocp.args.JsonSave(tokenizer)), force=True)
        except Exception as e:  # whatever the storage made orbax raise
            raise self._failed(e) from None

    def check(self) -> None:
        """Raise (one line) if the save being written in the background has failed: a look
        at its future, cheap enough for every step, so that a run stops within a save's
        time of a full disk or a lost bucket instead of training on without checkpoints."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from None

    def _failed(self, error: Exception) -> SaveFailed:
        try:
            self.manager.reload()
            good = [s for s in self.manager.all_steps() if s != self.pending]
        except Exception:  # the storage is gone altogether
            good = []
        return SaveFailed(
            f"saving checkpoint {self.pending} in {self.directory} failed: {one_line(error)}; "
            f"the newest complete checkpoint is "
            f"{self.directory / str(max(good)) if good else 'none'}; fix the storage (space, "
            "permissions), then run the same command again to continue from it")

    def restore(self, step: int, abstract_state: Any, shardings: Any,
                data: bool = True) -> tuple[Any, dict | None]:
        """The train state of `step`, placed in `shardings`, and (if `data`) the saved data
        state, merged over the processes that wrote it."""
        if step not in self.manager.all_steps():
            raise ConfigError(f"no checkpoint of step {step} in {self.directory}; it has "
                              f"{self.steps() or 'none'}")
        saved = self.manager.item_metadata(step)["state"]
        layouts.check_architecture(saved["params"], abstract_state["params"],
                           f"checkpoint {self.directory / str(step)}")
        target, finish = layouts.restore_targets(saved, abstract_state, shardings)
        items = {"state": ocp.args.StandardRestore(target)}
        if data:
            items["data"] = _DataRestore(_IteratorState())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return finish(restored["state"]), restored["data"].state if data else None

    def restore_newest(self, abstract_state: Any, shardings: Any
                       ) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as (step, state, data state); None if there are
        none. Unreadable ones are reported and moved aside, never deleted; a user error
        (another architecture, other data settings) is raised, not skipped."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state, shardings)
            except ConfigError:
                raise
            except Exception as e:  # whatever a damaged checkpoint makes orbax raise
                failures.append((step, one_line(e)))
                print(f"maxgpt: checkpoint {self.directory / str(step)} is unreadable "
                      f"({failures[-1][1]}); trying the one before", file=sys.stderr, flush=True)
                continue
            # Only now that an older one restored (so our reading code works) are the newer,
            # unreadable ones set aside, so that their steps can be written again.
            for bad, _ in failures:
                self._set_aside(bad)
            return (step, *restored)
        if failures:
            raise ConfigError(f"no readable checkpoint in {self.directory} (unreadable: "
                              + "; ".join(f"{s}: {r}" for s, r in failures)
                              + "); nothing was changed")
        return None

    def _set_aside(self, step: int) -> None:
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and source.exists():
            source.rename(target)
            print(f"maxgpt: moved the unreadable {source} to {target}", file=sys.stderr,
                  flush=True)
        self.manager.reload()  # forget the step, so that it can be written again

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None
        finally:
            try:
                self.manager.close()
            except Exception:  # after a failed save: already reported above
                pass


class SaveTimer:
    """`checkpoint.every_minutes`: a save once that long has passed since the last one.

    Every process must save at the same step, and their clocks differ, so each step the
    processes' votes ("my clock says it is time") are combined on the devices by one tiny
    max-reduction, dispatched behind the step and read after the next one: no process waits
    for it, and all read the same answer at the same step.
    """

    def __init__(self, minutes: float, mesh: jax.sharding.Mesh):
        self.seconds, self.last, self.pending = minutes * 60, time.monotonic(), None
        if self.seconds > 0:
            self.size = mesh.devices.size
            self.sharding = sharding.per_device(mesh)
            self.any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))

    def due(self) -> bool:
        """Whether to save after the step just dispatched: the answer to the votes cast at
        the previous call (one step late, the same on every process)."""
        if self.seconds <= 0:
            return False
        vote = np.array([time.monotonic() - self.last >= self.seconds], np.int32)
        votes = jax.make_array_from_callback((self.size,), self.sharding, lambda _: vote)
        previous, self.pending = self.pending, self.any(votes)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))

    def saved(self) -> None:
        """A save happened (for any reason): the clock restarts; the vote in flight, cast
        before it, is dropped (on every process alike)."""
        self.last, self.pending = time.monotonic(), None


def load_params(path: PathLike, abstract_params: Any, shardings: Any) -> tuple[Any, str]:
    """Parameters only (no optimizer state, no step) of another run, for
    `checkpoint.load_params_from`: PATH is a run directory (its newest checkpoint) or one of
    its step directories, `RUN/checkpoints/STEP`. Returns them placed in `shardings`, and
    the checkpoint they came from."""
    path = absolute(as_path(path))
    if path.name.isdigit() and path.parent.name == "checkpoints":
        directory, step = path.parent, int(path.name)
    else:
        directory, step = path / "checkpoints", None
    if not directory.is_dir():
        raise ConfigError(f"checkpoint.load_params_from={path}: no checkpoints there "
                          "(give a run directory or RUN/checkpoints/STEP)")
    _quiet_storage_noise()
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("state",), item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise ConfigError(f"checkpoint.load_params_from={path}: no such checkpoint")
        where = str(directory / str(step))
        saved = manager.item_metadata(step)["state"]["params"]
        layouts.check_architecture(saved, abstract_params, f"checkpoint {where}")
        params, finish = layouts.restore_targets(saved, abstract_params, shardings)
        target = {"params": params}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    finally:
        manager.close()
    return finish(restored["state"]["params"]), where


def save_tree(path, tree: Any) -> None:
    """A pytree of arrays (quantized weights, maxgpt/inference.py) written to `path` with
    orbax, under a temporary name renamed when whole; every process calls it."""
    _quiet_storage_noise()
    with ocp.StandardCheckpointer() as writer:
        writer.save(as_path(path), tree)
        writer.wait_until_finished()


def restore_tree(path, target: Any) -> Any:
    """What `save_tree` wrote, into `target`'s structure, shapes and shardings (a pytree of
    jax.ShapeDtypeStruct with shardings)."""
    _quiet_storage_noise()
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(as_path(path), target)
