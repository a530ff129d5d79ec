"""Which saved step a resumed run starts from, passing over steps that do not restore.

`Resumption.find` picks checkpoint.step or the newest step whose metadata reads; `restore`
restores the newest one of a stage whose arrays restore and verify, naming every step passed over,
and sets aside the later ones so that the run's next saves are not declined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from absl import logging

from metaphorstar_jax.training.checkpoint_files import CheckpointError

if TYPE_CHECKING:
  from metaphorstar_jax.training.checkpoints import Checkpointer


class Resumption:
  """The saved step a resumed run starts from: checkpoint.step when it names one (`requested`
  not None), else the newest step that restores. `step`, `meta` (stage and step) and `record` (the
  saving run's config and data) describe the current choice.

  A step whose metadata cannot be read is passed over at once; one whose arrays do not restore
  (a missing or truncated file, a checksum that does not match) when `restore` finds it so.
  Every step passed over is named in a warning, with why. A requested step is never swapped for
  another: its failure is an error.
  """

  def __init__(self, checkpointer: Checkpointer, requested: int | None, saved: list[int]):
    self._checkpointer = checkpointer
    self.requested = requested
    self._candidates = [requested] if requested is not None else sorted(saved, reverse=True)
    self.skipped: list[tuple[int, str]] = []
    self.step, self.meta, self.record = None, None, None
    self._next()

  @classmethod
  def find(cls, checkpointer: Checkpointer,
           requested: int | None = None) -> Resumption | None:
    """The resumption of the run saved under `checkpointer`; None when it holds no step."""
    saved = checkpointer.all_steps()
    if requested is not None and requested not in saved:
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
    advice = ("Pick another with --config.checkpoint.step=N" if self.requested is not None else
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
