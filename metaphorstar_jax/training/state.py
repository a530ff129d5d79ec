"""What a run carries from step to step, and the part of it a checkpoint holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging
from flax import nnx


@dataclasses.dataclass
class RunState:
  params: Any  # nnx.State of the policy
  opt_state: Any
  ref_params: Any  # the frozen reference policy of a KL-regularised stage, else None
  global_step: int
  stage_index: int
  stage_step: int
  kl_coef: float = 0.0  # the in-reward KL coefficient (moves under the adaptive controller)


def checkpoint_arrays(run: RunState) -> dict:
  arrays = {"params": nnx.to_pure_dict(run.params), "opt_state": run.opt_state}
  if run.ref_params is not None:
    arrays["ref_params"] = nnx.to_pure_dict(run.ref_params)
  return arrays


def restore_into(run: RunState, restored: dict) -> None:
  nnx.replace_by_pure_dict(run.params, restored["params"])
  run.opt_state = restored["opt_state"]
  if "ref_params" in restored:
    nnx.replace_by_pure_dict(run.ref_params, restored["ref_params"])


def save_run(checkpointer, run: RunState, data_state, stage_name: str, run_record: dict) -> None:
  """Checkpoints global step `run.global_step`: the run's arrays, the data stream's state
  `data_state`, where the run is (stage and step, for `resume_run`) and `run_record`."""
  checkpointer.save(run.global_step, checkpoint_arrays(run), data_state,
                    {"stage_index": run.stage_index, "stage_step": run.stage_step,
                     "global_step": run.global_step, "stage": stage_name,
                     "kl_coef": run.kl_coef}, run_record)


def resume_run(run: RunState, restored: tuple[Any, dict, dict], stream) -> None:
  """Puts a restored step (Resumption.restore's (arrays, data state, meta)) back into `run` and
  the data `stream`, and logs where the run resumes."""
  arrays, data_state, meta = restored
  restore_into(run, arrays)
  stream.set_state(data_state)
  run.stage_step, run.global_step = meta["stage_step"], meta["global_step"]
  run.kl_coef = float(meta.get("kl_coef", run.kl_coef))  # absent from older checkpoints
  logging.info("Resumed stage %s at its step %d (global %d).", meta["stage"], run.stage_step,
               run.global_step)


def check_updates(run: RunState, max_consecutive_nonfinite: int, checkpointer) -> None:
  """Stops the run (FloatingPointError naming the step and the newest checkpoint) once
  `max_consecutive_nonfinite` optimizer updates in a row had NaN or inf gradients.

  optax.apply_if_finite skips such updates, but after that many it gives up and applies the
  next one, which would put NaN into every parameter.
  """
  in_a_row = int(jax.device_get(run.opt_state.notfinite_count))
  if in_a_row and in_a_row >= max_consecutive_nonfinite:
    latest = checkpointer.latest_step()
    saved = (f"the newest checkpoint, of step {latest} under {checkpointer.directory}, holds "
             "finite parameters (non-finite ones are never saved)" if latest is not None
             else "no checkpoint was saved")
    raise FloatingPointError(
        f"Step {run.global_step}: the last {in_a_row} optimizer updates had NaN or inf "
        f"gradients (optim.max_consecutive_nonfinite={max_consecutive_nonfinite}), so the run "
        f"stops before one is applied; {saved}. Look at the loss and grad_norm metrics; a lower "
        "learning rate or a finite reward usually fixes it.")
