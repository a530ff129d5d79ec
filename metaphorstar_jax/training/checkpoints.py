"""Orbax checkpoints of a training run: arrays (params, optimizer, step, PRNG), data position, config.

Every host calls `save` and `restore`; Orbax writes each array shard from the host that holds it,
to a local path or `gs://`. Saves are asynchronous: training continues while the previous step's
arrays are written, and `wait` blocks until they are on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints under `directory`, one per saved step."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    # Orbax's array writer wants absolute paths; a relative workdir means the current directory.
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("arrays", "data", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, arrays: Any, data_state: dict, meta: dict) -> None:
    """Saves a pytree of arrays, the data iterator's state and JSON metadata at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str)))))
    logging.info("Checkpoint of step %d queued under %s.", step, self.directory)

  def restore(self, step: int, abstract_arrays: Any) -> tuple[Any, dict, dict]:
    """Restores step `step` into the shapes, dtypes and shardings of `abstract_arrays`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_arrays)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored.arrays, restored.data, restored.meta

  def restore_saved_arrays(self, step: int) -> Any:
    """The arrays of step `step` as saved, on this process's first device (no target structure
    or sharding needed), e.g. to evaluate or export a run on another machine. Without a target
    Orbax would insist on the saving run's device topology (a pod's checkpoint on a workstation)."""
    saved = ocp.StandardCheckpointer().metadata(
        os.path.join(self.directory, str(step), "arrays")).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
    return self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target))).arrays

  def restore_meta(self, step: int) -> dict:
    """Only the JSON metadata of step `step` (which stage, which step), without the arrays."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
