"""Resuming: the newest step that restores is taken and the damaged ones after it are passed over,
named and set aside; a named step is restored or refused, never swapped for another."""

import os

import numpy as np
import pytest
from helpers import largest_data_file, run_like_arrays, save_steps

from metaphorstar_jax.training import checkpoints, resumption


@pytest.mark.parametrize("damage", ["metadata deleted", "data file truncated",
                                    "data file deleted"])
def test_resumption_passes_over_a_damaged_latest_step(tmp_path, damage, caplog):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory)
  if damage == "metadata deleted":
    os.remove(os.path.join(directory, "3", "meta", "metadata"))
  elif damage == "data file truncated":
    path = largest_data_file(directory, 3)
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    os.remove(largest_data_file(directory, 3))
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    resume = resumption.Resumption.find(ckpt)
    arrays, data_state, meta = resume.restore(run_like_arrays(0), stage_index=0)
    assert resume.step == 2 and meta["step"] == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(np.asarray(arrays["params"]["kernel"]),
                                  np.asarray(run_like_arrays(2)["params"]["kernel"]))
    assert [step for step, _ in resume.skipped] == [3]
    assert "Resuming from step 2; passed over: step 3" in caplog.text
    # The damaged step is moved aside, so that the resumed run's step 3 can be saved.
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, run_like_arrays(3), {}, {"stage_index": 0, "step": 3})
  assert os.listdir(str(tmp_path / "checkpoints.set_aside"))[0].startswith("3.")


def test_a_named_step_is_restored_or_refused_never_swapped(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(ValueError, match=r"checkpoint.step=7.*saved steps: \[1, 2, 3\]"):
      resumption.Resumption.find(ckpt, 7)
    resume = resumption.Resumption.find(ckpt, 1)
    _, data_state, _ = resume.restore(run_like_arrays(0), stage_index=0)
    assert data_state == {"position": 1} and ckpt.all_steps() == [1]
  os.truncate(largest_data_file(directory, 1), 10)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint .* restores.*step 1"):
      resumption.Resumption.find(ckpt, 1).restore(run_like_arrays(0), stage_index=0)
