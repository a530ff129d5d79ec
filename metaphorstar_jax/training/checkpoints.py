"""Orbax checkpoints of a training run: arrays (params, optimizer, step, PRNG), data position, config.

Every host calls `save` and `restore`; Orbax writes each array shard from the host that holds it,
to a local path or `gs://`. Saves are asynchronous: training continues while the previous step's
arrays are written, and `wait` blocks until they are on disk and raises, naming the step, if
writing them failed.

Each step also holds a JSON record of the run that saved it (`run`): its redacted config, a
fingerprint of its data and a checksum of every array. `restore` refuses arrays whose checksum
does not match, so damaged files are found before a run trains on them, and `save` refuses
parameters that are not finite.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

ITEMS = ("arrays", "data", "meta", "run")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or what was read back is not what was written."""


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints under `directory`, one per saved step.

  A context manager: leaving it waits for the last save and closes Orbax's threads, and when an
  error is already on its way out, a second one from closing is logged rather than hiding it.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    # Orbax's array writer wants absolute paths; a relative workdir means the current directory.
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._in_flight: int | None = None  # the step of a save that may still be being written
    self._closed = False
    self._manager = ocp.CheckpointManager(
        directory,
        # Step folders are made in `save` itself, so a read-only or full disk raises there.
        # Made in the background, a failure left Orbax's threads waiting minutes at exit for
        # the folder that never came.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
        item_names=ITEMS,
    )

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception as close_error:  # the error already raised says more
      logging.error("Closing the checkpointer after an error failed too: %s", close_error)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, arrays: Any, data_state: dict, meta: dict,
           run_record: dict | None = None) -> None:
    """Saves a pytree of arrays, the data iterator's state and JSON metadata at `step`, with
    `run_record` (the run's config and data fingerprint) and the arrays' checksums.

    Raises CheckpointError when the previous save failed, when `arrays["params"]` holds NaN or
    inf, when writing fails (at once for a synchronous save, else at `check` or `wait`), and when
    Orbax declines the save (it does for a step at or below the latest one already in the
    folder), instead of the run going on without its checkpoint.
    """
    self.wait()  # Orbax would wait for the previous save anyway; its error names that step
    checksums, finite = array_summaries(arrays)
    bad = [name for name, ok in finite.items() if name.startswith("params/") and not ok]
    if bad:
      raise CheckpointError(
          f"Not saving step {step}: its parameters hold NaN or inf ({len(bad)} arrays, e.g. "
          f"{', '.join(bad[:3])}). The last checkpoint, step {self.latest_step()}, is the "
          "newest finite one; lower the learning rate or look at this step's metrics.")
    record = dict(run_record or {}, checksums=checksums)
    self._in_flight = step
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(_json(meta)),
          run=ocp.args.JsonSave(_json(record))))
    except Exception as e:
      self._in_flight = None
      raise CheckpointError(f"Saving step {step} under {self.directory} failed: {e}") from e
    if not saved:
      self._in_flight = None
      raise CheckpointError(
          f"Orbax declined to save step {step} under {self.directory}, whose latest step is "
          f"{self.latest_step()}: the folder holds a later or equal step of another run. Train "
          "into a fresh workdir, resume this one, or clear it (checkpoint.overwrite=True).")
    logging.info("Checkpoint of step %d queued under %s.", step, self.directory)

  def check(self) -> None:
    """Raises CheckpointError if a save has finished and failed; returns at once while one is
    still being written. Called once per step, so a failed save stops the run a step later."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is on disk; CheckpointError naming its step if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"The checkpoint of step {step} under {self.directory} was not "
                            f"written: {e}") from e

  def reached_preemption(self, step: int) -> bool:
    """Orbax's pre-emption sync point: True on every process once JAX has been told of a
    pre-emption (multi-host runs only)."""
    return self._manager.reached_preemption(step)

  def restore(self, step: int, abstract_arrays: Any) -> tuple[Any, dict, dict]:
    """Restores step `step` into the shapes, dtypes and shardings of `abstract_arrays`.

    CheckpointError when an array's checksum differs from the one saved with it (a damaged
    file); Orbax's or TensorStore's error when a file is missing or cannot be read.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_arrays)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    saved = self.restore_run_record(step).get("checksums")
    if saved is not None:
      found, _ = array_summaries(restored.arrays)
      # A leaf restored into another dtype (the run changed param_dtype) has other bytes.
      damaged = [name for name, (dtype, checksum) in saved.items()
                 if name in found and found[name][0] == dtype and found[name][1] != checksum]
      if damaged:
        raise CheckpointError(
            f"Step {step} under {self.directory} is damaged: {len(damaged)} arrays differ from "
            f"what was saved (checksum), e.g. {', '.join(damaged[:3])}.")
    return restored.arrays, restored.data, restored.meta

  def restore_run_record(self, step: int) -> dict:
    """The JSON record of the run that saved `step` (config, data, checksums); {} for a step
    saved before runs were recorded."""
    if "://" not in self.directory and not os.path.isdir(
        os.path.join(self.directory, str(step), "run")):
      return {}
    return self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run

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

  def set_aside(self, steps: list[int]) -> None:
    """Moves the checkpoints of `steps` out of the Orbax folder, into `<folder>.set_aside/`,
    where nothing reads them but a person."""
    aside = self.directory.rstrip("/") + ".set_aside"
    if jax.process_index() == 0:
      for step in steps:
        target = os.path.join(aside, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
        epath.Path(aside).mkdir(parents=True, exist_ok=True)
        epath.Path(self.directory, str(step)).rename(target)
      logging.warning("Set aside the checkpoints of steps %s (moved to %s): the run resumes "
                      "from an earlier step.", steps, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("metaphorstar_jax: checkpoints set aside")
    self._manager.reload()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._manager.close()


class Resumption:
  """The saved step a resumed run starts from: checkpoint.step when it names one (`requested`
  >= 0), else the newest step that restores. `step`, `meta` (stage and step) and `record` (the
  saving run's config and data) describe the current choice.

  A step whose metadata cannot be read is passed over at once; one whose arrays do not restore
  (a missing or truncated file, a checksum that does not match) when `restore` finds it so.
  Every step passed over is named in a warning, with why. A requested step is never swapped for
  another: its failure is an error.
  """

  def __init__(self, checkpointer: Checkpointer, requested: int, saved: list[int]):
    self._checkpointer = checkpointer
    self.requested = requested
    self._candidates = [requested] if requested >= 0 else sorted(saved, reverse=True)
    self.skipped: list[tuple[int, str]] = []
    self.step, self.meta, self.record = None, None, None
    self._next()

  @classmethod
  def find(cls, checkpointer: Checkpointer, requested: int = -1) -> Resumption | None:
    """The resumption of the run saved under `checkpointer`; None when it holds no step."""
    saved = checkpointer.all_steps()
    if requested >= 0 and requested not in saved:
      raise ValueError(f"checkpoint.step={requested}: {checkpointer.directory} holds no "
                       f"checkpoint of that step; saved steps: {saved}.")
    return cls(checkpointer, requested, saved) if saved else None

  def _next(self) -> None:
    """Moves to the next candidate whose metadata reads; CheckpointError when none is left."""
    while self._candidates:
      step = self._candidates.pop(0)
      try:
        meta = self._checkpointer.restore_meta(step)
        record = self._checkpointer.restore_run_record(step)
      except Exception as e:  # Orbax and TensorStore raise many kinds
        self._skip(step, e)
        continue
      self.step, self.meta, self.record = step, meta, record
      return
    reasons = "; ".join(f"step {step}: {why}" for step, why in self.skipped)
    advice = ("Pick another with --config.checkpoint.step=N" if self.requested >= 0 else
              "Train afresh with --config.checkpoint.resume=False "
              "--config.checkpoint.overwrite=True")
    raise CheckpointError(f"No checkpoint under {self._checkpointer.directory} restores "
                          f"({reasons}). {advice}.")

  def _skip(self, step: int, error: Exception) -> None:
    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    self.skipped.append((step, why))
    logging.warning("Not resuming from step %d under %s: %s", step,
                    self._checkpointer.directory, why)

  def restore(self, abstract_arrays: Any, stage_index: int) -> tuple[Any, dict, dict] | None:
    """(arrays, data state, meta) of the newest step of stage `stage_index` that restores into
    `abstract_arrays`; None when the next step to try is of an earlier stage (`meta` says which),
    whose arrays have another structure. Steps after the one restored are set aside."""
    while self.meta["stage_index"] == stage_index:
      try:
        found = self._checkpointer.restore(self.step, abstract_arrays)
      except Exception as e:
        self._skip(self.step, e)
        self._next()
        continue
      later = [s for s in self._checkpointer.all_steps() if s > self.step]
      if later:  # or every save after this step would be declined as older than the latest
        self._checkpointer.set_aside(later)
      if self.skipped:
        logging.warning("Resuming from step %d; passed over: %s.", self.step,
                        "; ".join(f"step {step} ({why})" for step, why in self.skipped))
      return found
    return None


def _json(tree: dict) -> dict:
  return json.loads(json.dumps(tree, default=str))


def _words(x: jax.Array) -> jax.Array:
  """The bytes of `x` as uint32 words (narrower types widened; 8-byte ones split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """Sum over the words of `x` of word × (2·position + 1), modulo 2^32.

  Integer sums do not depend on the order of reduction, so the value is the same however the
  array is sharded, on any number of hosts, and no host gathers the model to compute it. Odd
  weights are invertible modulo 2^32: any one changed word, a flipped byte say, changes the sum.
  """
  words = _words(x)
  position, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = stride * words.shape[axis] % 2**32
  return jnp.sum(words * (2 * position + 1), dtype=jnp.uint32)


def _all_finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.isfinite(x).all()
  return jnp.array(True)


@jax.jit
def _summaries(arrays):
  return jax.tree.map(_checksum, arrays), jax.tree.map(_all_finite, arrays)


def array_summaries(arrays: Any) -> tuple[dict[str, list], dict[str, bool]]:
  """({leaf name: [dtype, checksum]}, {leaf name: all finite}) of a pytree of arrays; names are
  the keys from the root joined by '/', e.g. 'params/visual/patch_embed/kernel'."""
  arrays = jax.tree.map(jnp.asarray, arrays)
  checksums, finite = jax.device_get(_summaries(arrays))
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
  dtypes = {name(p): str(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(arrays)}
  return ({name(p): [dtypes[name(p)], int(c)]
           for p, c in jax.tree_util.tree_leaves_with_path(checksums)},
          {name(p): bool(f) for p, f in jax.tree_util.tree_leaves_with_path(finite)})


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
