"""A run's checkpoint folder as files, read without a training run (evaluation, export, ablations).

`ITEMS` are the parts Orbax writes in each step's folder; `checkpoint_location` finds the Orbax
folder from a run, checkpoints or step folder; `saved_steps` and `resolve_step` list and pick
finished steps without creating anything; `SavedArrays` reads saved arrays one leaf at a time.
`CheckpointError` is the error for a checkpoint that was not written or does not read back as
written.
"""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

# The items of every step's folder: the arrays, the data position, the metadata (stage, step)
# and the record of the run that saved it (config, data fingerprint, checksums).
ITEMS = ("arrays", "data", "meta", "run")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or what was read back is not what was written."""


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


def checkpoint_step(checkpoint: str, step: int | None = None) -> tuple[str, str, int]:
  """(Orbax folder, run folder, step) of `checkpoint` (see checkpoint_location): `step`, else
  the step a step's folder names, else the latest saved (see resolve_step)."""
  manager_dir, run_dir = checkpoint_location(checkpoint)
  if step is None and os.path.basename(os.path.abspath(checkpoint)).isdigit():
    step = int(os.path.basename(os.path.abspath(checkpoint)))
  return manager_dir, run_dir, resolve_step(manager_dir, step)


def saved_steps(directory: str) -> list[int]:
  """The steps with a finished checkpoint under the Orbax folder `directory`, ascending; [] when
  there is none (or no such folder). Never creates anything."""
  if "://" not in directory and not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(directory, item_names=ITEMS,
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
