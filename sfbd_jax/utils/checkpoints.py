"""Orbax checkpoints of the whole training state.

Restores are bit-exact into the structure of an abstract state (``jax.eval_shape`` of the
initialiser), so optax's NamedTuple states come back with their types. A checkpoint that
cannot be read raises ``CheckpointError`` naming it; nothing is ever deleted on a failed read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory exists but cannot be restored."""


def abstract_like(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) placed with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
    """A thin owner of an ``ocp.CheckpointManager`` under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int | None = 3,
                 enable_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=enable_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = True) -> None:
        """Start saving ``state`` as ``step`` (asynchronous; see ``wait``)."""
        self.manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restore checkpoint ``step`` into the structure/shardings of ``abstract_state``."""
        path = os.path.join(self.directory, str(step))
        try:
            return self.manager.restore(int(step),
                                        args=ocp.args.StandardRestore(abstract_state))
        except Exception as err:  # orbax raises many types; name the checkpoint in every case
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointError(
                f"cannot restore checkpoint {path}: {type(err).__name__}: {err}\n"
                f"The checkpoint was left in place (other checkpoints: {others or 'none'}). "
                "Move the broken step directory aside to resume from an earlier one, or start "
                "a fresh run in another --workdir.") from err

    def restore_latest(self, abstract_state: Any) -> Any | None:
        """The latest checkpoint restored, or None when the directory holds none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
