"""Resumable training state on disk with orbax-checkpoint.

A checkpoint is the `TrainState` (LoRA factors, optimizer state, step) as an orbax PyTree plus a small JSON
record (step, data position, seed, a digest of the config that produced it). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed at any moment leaves only whole
checkpoints behind; `latest` returns the newest complete one. Saves are synchronous: a LoRA state is
small, and a save that returns is on disk.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpoints:
    """The checkpoints of one run directory: save every N steps, keep the last K, restore the latest."""

    def __init__(self, directory, keep: int):
        directory = epath.Path(directory)  # local, or a remote path such as gs://bucket/run/checkpoints
        self.directory = directory if "://" in str(directory) else directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, record: dict) -> None:
        """Write the state and its JSON record for ``step`` (atomically, replacing nothing else)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def latest(self, like: Any) -> tuple[Any, dict] | None:
        """(state, record) of the newest complete checkpoint, restored into the structure of ``like``."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        return restored.state, restored.record

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self.manager.close()
