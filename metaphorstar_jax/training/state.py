"""What a run carries from step to step, and the part of it a checkpoint holds."""

from __future__ import annotations

import dataclasses
from typing import Any

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
