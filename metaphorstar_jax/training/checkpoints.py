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
import numpy as np
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
    """Saves a pytree of arrays, the data iterator's state and JSON metadata at `step`.

    Raises when Orbax declines the save (it does for a step at or below the latest one already
    in the folder), instead of the run going on without its checkpoint.
    """
    saved = self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str)))))
    if not saved:
      raise RuntimeError(
          f"Orbax declined to save step {step} under {self.directory}, whose latest step is "
          f"{self.latest_step()}: the folder holds a later or equal step of another run. Train "
          "into a fresh workdir, resume this one, or clear it (checkpoint.overwrite=True).")
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


def checkpoint_location(path: str) -> tuple[str, str]:
  """(Orbax folder, run folder) for a run folder, its checkpoints/ folder or one step's folder
  (`.../checkpoints/50`); FileNotFoundError when `path` does not exist."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), path
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "arrays")):
    return os.path.dirname(path), os.path.dirname(os.path.dirname(path))
  if os.path.isdir(path):
    return path, os.path.dirname(path)
  raise FileNotFoundError(f"Checkpoint path {path!r} does not exist; pass a training run folder "
                          "(holding checkpoints/) or a checkpoints folder.")


def saved_steps(directory: str) -> list[int]:
  """The steps with a finished checkpoint under the Orbax folder `directory`, ascending; [] when
  there is none (or no such folder). Never creates anything."""
  if "://" not in directory and not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(directory, item_names=("arrays", "data", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def resolve_step(directory: str, step: int | None = None) -> int:
  """`step` if `directory` holds a finished checkpoint of it, else the latest one with None;
  FileNotFoundError when there is none at all, ValueError naming the saved steps otherwise."""
  available = saved_steps(directory)
  if not available:
    raise FileNotFoundError(f"No checkpoint under {directory}; has the run saved one "
                            "(config.checkpoint.every)?")
  if step is None:
    return available[-1]
  if step not in available:
    raise ValueError(f"No checkpoint of step {step} under {directory}; saved steps: "
                     f"{available}.")
  return step


class SavedArrays:
  """The arrays of one saved step, read one leaf at a time into host memory.

  Nothing but the leaves asked for is read, whatever mesh or number of hosts saved them, so a
  pod's checkpoint opens on one machine and, e.g., exporting the policy never touches the
  optimizer state. A leaf is named by its keys from the root: ("params", "visual", ...).
  """

  def __init__(self, directory: str, step: int):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.path = os.path.join(directory, str(step), "arrays")
    self._checkpointer = ocp.PyTreeCheckpointer()
    self.tree = self._checkpointer.metadata(self.path).item_metadata.tree

  def metadata(self, keys: tuple[str, ...]):
    """The saved leaf's metadata (.shape, .dtype); KeyError naming the missing key."""
    node = self.tree
    for depth, key in enumerate(keys):
      if not isinstance(node, dict) or key not in node:
        raise KeyError(f"Checkpoint {self.path} has no array {'/'.join(keys)} (no "
                       f"{'/'.join(keys[:depth + 1])!r}).")
      node = node[key]
    return node

  def read(self, keys: tuple[str, ...]) -> np.ndarray:
    """The whole leaf at `keys` as a NumPy array of its saved dtype."""
    self.metadata(keys)
    item, restore_args = np.zeros(()), ocp.RestoreArgs(restore_type=np.ndarray)
    for key in reversed(keys):
      item, restore_args = {key: item}, {key: restore_args}
    restored = self._checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    for key in keys:
      restored = restored[key]
    return restored
