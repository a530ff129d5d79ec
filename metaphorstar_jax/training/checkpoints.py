"""Orbax checkpoints of a training run: arrays (params, optimizer, step, PRNG), data position, config.

Every host calls `save` and `restore`; Orbax writes each array shard from the host that holds it,
to a local path or `gs://`. Saves are asynchronous: training continues while the previous step's
arrays are written, and `wait` blocks until they are on disk and raises, naming the step, if
writing them failed.

Each step also holds a JSON record of the run that saved it (`run`): its redacted config, a
fingerprint of its data and a checksum of every array. `restore` refuses arrays whose checksum
does not match, so damaged files are found before a run trains on them, and `save` refuses
parameters that are not finite.

The pieces live in their own modules and are named here too, so that callers need only
`checkpoints`: `checksums` (array checksums), `checkpoint_files` (folders, saved steps and arrays
read without a run) and `resumption` (the step a resumed run starts from).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from metaphorstar_jax.training.checkpoint_files import (  # noqa: F401  (named here for callers)
    ITEMS, CheckpointError, SavedArrays, checkpoint_location, checkpoint_step, resolve_step,
    saved_steps)
from metaphorstar_jax.training.checksums import array_summaries
from metaphorstar_jax.training.resumption import Resumption  # noqa: F401  (named here for callers)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints under `directory`, one per saved step.

  A context manager: leaving it waits for the last save and closes Orbax's threads, and when an
  error is already on its way out, a second one from closing is logged rather than hiding it.
  """

  @classmethod
  def for_run(cls, config) -> Checkpointer:
    """The checkpoints of the run `config`: workdir/checkpoints, as config.checkpoint says."""
    return cls(os.path.join(config.workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
               async_save=config.checkpoint.async_save)

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


def _json(tree: dict) -> dict:
  return json.loads(json.dumps(tree, default=str))
