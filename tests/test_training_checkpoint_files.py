"""A checkpoint folder read without a run: where a path's checkpoints are, the saved steps (never
creating a folder), picking a step, and reading saved arrays leaf by leaf."""

import os

import numpy as np
import pytest
from helpers import run_like_arrays, save_steps

from metaphorstar_jax.training import checkpoint_files


def test_checkpoint_location_from_a_run_its_checkpoints_or_one_step(tmp_path):
  run = tmp_path / "run"
  orbax_folder = run / "checkpoints"
  (orbax_folder / "50" / "arrays").mkdir(parents=True)
  expected = (str(orbax_folder), str(run))
  assert checkpoint_files.checkpoint_location(str(run)) == expected
  assert checkpoint_files.checkpoint_location(str(orbax_folder)) == expected
  assert checkpoint_files.checkpoint_location(str(orbax_folder / "50")) == expected
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint_files.checkpoint_location(str(tmp_path / "missing"))


def test_saved_steps_and_resolve_step(tmp_path):
  missing = str(tmp_path / "none")
  assert checkpoint_files.saved_steps(missing) == []
  assert not os.path.exists(missing)  # looking never creates the folder
  with pytest.raises(FileNotFoundError, match="No checkpoint under"):
    checkpoint_files.resolve_step(missing)
  directory = str(tmp_path / "checkpoints")
  save_steps(directory, steps=(2, 4))
  os.makedirs(os.path.join(directory, "6.orbax-checkpoint-tmp-1"))  # an unfinished save
  assert checkpoint_files.saved_steps(directory) == [2, 4]
  assert checkpoint_files.resolve_step(directory) == 4
  assert checkpoint_files.resolve_step(directory, 2) == 2
  with pytest.raises(ValueError, match=r"step 3 .*saved steps: \[2, 4\]"):
    checkpoint_files.resolve_step(directory, 3)


def test_saved_arrays_read_one_leaf_as_saved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory, steps=(1, 2))
  saved = checkpoint_files.SavedArrays(directory, 2)
  expected = run_like_arrays(2)
  kernel = saved.read(("params", "kernel"))
  assert isinstance(kernel, np.ndarray) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, np.asarray(expected["params"]["kernel"]))
  bias = saved.read(("params", "bias"))
  assert str(bias.dtype) == "bfloat16"
  np.testing.assert_array_equal(bias.astype(np.float32), np.full(8, 2.0, np.float32))
  assert tuple(saved.metadata(("params", "kernel")).shape) == (64, 64)
  with pytest.raises(KeyError, match=r"no array params/visual/kernel \(no 'params/visual'\)"):
    saved.read(("params", "visual", "kernel"))
