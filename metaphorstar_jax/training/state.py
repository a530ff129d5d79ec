"""What a run carries from step to step, and the part of it a checkpoint holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
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
