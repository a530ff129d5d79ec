"""The run state: the arrays a checkpoint holds (the reference policy only when there is one),
restored in place, and a run stopped once updates stay non-finite."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax.training import state as state_lib


def policy_params(seed):
  return nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(seed)), nnx.Param)


def run_state(ref_params=None, notfinite_count=0):
  return state_lib.RunState(params=policy_params(0),
                            opt_state=types.SimpleNamespace(notfinite_count=jnp.int32(
                                notfinite_count)),
                            ref_params=ref_params, global_step=7, stage_index=1, stage_step=3)


def test_checkpoint_arrays_hold_the_reference_policy_only_when_there_is_one():
  without = state_lib.checkpoint_arrays(run_state())
  assert sorted(without) == ["opt_state", "params"]
  assert sorted(without["params"]) == ["bias", "kernel"]  # plain dicts, no nnx variables
  assert isinstance(without["params"]["kernel"], jnp.ndarray)
  with_ref = state_lib.checkpoint_arrays(run_state(ref_params=policy_params(1)))
  assert sorted(with_ref) == ["opt_state", "params", "ref_params"]


def test_restore_into_replaces_params_reference_and_optimizer_state_in_place():
  run = run_state(ref_params=policy_params(1))
  params, ref_params = run.params, run.ref_params
  saved = state_lib.checkpoint_arrays(run_state(ref_params=policy_params(3)))
  saved["params"] = {"kernel": saved["params"]["kernel"] + 1, "bias": saved["params"]["bias"]}
  state_lib.restore_into(run, saved)
  assert run.params is params and run.ref_params is ref_params  # the same nnx.State objects
  np.testing.assert_array_equal(np.asarray(run.params["kernel"][...]),
                                np.asarray(saved["params"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(run.ref_params["kernel"][...]),
                                np.asarray(policy_params(3)["kernel"][...]))
  assert run.opt_state is saved["opt_state"]


class FakeCheckpointer:
  directory = "/runs/x/checkpoints"

  def __init__(self, latest):
    self.latest = latest

  def latest_step(self):
    return self.latest


def test_check_updates_stops_the_run_once_updates_stay_non_finite():
  state_lib.check_updates(run_state(notfinite_count=0), 2, FakeCheckpointer(5))
  state_lib.check_updates(run_state(notfinite_count=1), 2, FakeCheckpointer(5))
  with pytest.raises(FloatingPointError,
                     match=r"Step 7: the last 2 optimizer updates.*step 5 under /runs/x"):
    state_lib.check_updates(run_state(notfinite_count=2), 2, FakeCheckpointer(5))
  with pytest.raises(FloatingPointError, match="no checkpoint was saved"):
    state_lib.check_updates(run_state(notfinite_count=3), 2, FakeCheckpointer(None))


class RecordingCheckpointer:
  def save(self, step, arrays, data_state, meta, run_record):
    self.saved = (step, arrays, data_state, meta, run_record)


class Stream:
  state = None

  def set_state(self, state):
    self.state = state


def test_what_save_run_records_resume_run_puts_back(caplog):
  run = run_state()
  run.kl_coef = 0.25
  checkpointer = RecordingCheckpointer()
  state_lib.save_run(checkpointer, run, {"position": 5}, "grpo", {"config": {}})
  step, arrays, data_state, meta, record = checkpointer.saved
  assert step == 7 and record == {"config": {}} and data_state == {"position": 5}
  assert meta == {"stage_index": 1, "stage_step": 3, "global_step": 7, "stage": "grpo",
                  "kl_coef": 0.25}
  fresh, stream = run_state(), Stream()
  fresh.global_step, fresh.stage_step, fresh.kl_coef = 0, 0, 0.0
  with caplog.at_level("INFO"):
    state_lib.resume_run(fresh, (arrays, data_state, meta), stream)
  assert (fresh.global_step, fresh.stage_step, fresh.kl_coef) == (7, 3, 0.25)
  assert stream.state == {"position": 5}
  assert "Resumed stage grpo at its step 3 (global 7)" in caplog.text
  del meta["kl_coef"]  # a checkpoint from before the adaptive controller keeps the stage's
  state_lib.resume_run(fresh, (arrays, data_state, meta), stream)
  assert fresh.kl_coef == 0.25
