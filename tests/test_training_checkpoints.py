"""The Orbax checkpointer: a save Orbax declines or fails is an error naming its step, damaged
files are found on restore, non-finite parameters are never saved."""

import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from helpers import largest_data_file, run_like_arrays, save_steps

from metaphorstar_jax.training import checkpoints


def test_a_declined_save_raises(tmp_path):
  directory = str(tmp_path / "checkpoints")
  arrays = {"w": jnp.arange(4.0)}
  first = checkpoints.Checkpointer(directory, async_save=False)
  first.save(5, arrays, {}, {"run": "old"})
  first.close()
  second = checkpoints.Checkpointer(directory, async_save=False)
  with pytest.raises(RuntimeError, match="declined to save step 2.*latest step is 5"):
    second.save(2, arrays, {}, {"run": "new"})
  second.save(6, arrays, {}, {"run": "new"})  # a later step still saves
  second.close()
  assert checkpoints.saved_steps(directory) == [5, 6]


def test_a_flipped_byte_in_a_data_file_refuses_to_restore(tmp_path):
  directory = str(tmp_path / "checkpoints")
  save_steps(directory, steps=(1,))
  path = largest_data_file(directory, 1)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match="Step 1 .* damaged.*params/kernel"):
      ckpt.restore(1, run_like_arrays(1))


def test_non_finite_parameters_are_never_saved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  arrays = run_like_arrays(1)
  arrays["params"]["kernel"] = arrays["params"]["kernel"].at[3, 4].set(jnp.nan)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(1, run_like_arrays(1), {}, {})
    with pytest.raises(checkpoints.CheckpointError,
                       match="Not saving step 2: its parameters hold NaN.*params/kernel.*step 1"):
      ckpt.save(2, arrays, {}, {})
  assert checkpoints.saved_steps(directory) == [1]


READ_ONLY_SAVE = """
import errno, os, sys
import jax.numpy as jnp
from metaphorstar_jax.training import checkpoints
directory, mode = sys.argv[1], sys.argv[2]
real_mkdir = os.mkdir
def read_only_mkdir(path, *args, **kwargs):  # as root, chmod cannot make a folder read-only
  if os.fspath(path).startswith(os.path.join(directory, "2")):
    raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
  return real_mkdir(path, *args, **kwargs)
with checkpoints.Checkpointer(directory, async_save=mode == "async") as ckpt:
  ckpt.save(1, {"w": jnp.arange(4.0)}, {}, {})
  os.mkdir = read_only_mkdir
  try:
    ckpt.save(2, {"w": jnp.arange(4.0)}, {}, {})
  except checkpoints.CheckpointError as e:
    print("raised:", e)
  ckpt.save(3, {"w": jnp.arange(4.0)}, {}, {})  # the disk is writable again
print("saved:", checkpoints.saved_steps(directory))
"""


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_save_to_a_read_only_disk_raises_in_that_save_and_the_process_exits(tmp_path, mode):
  """Orbax made the step folder in a background thread: the error came a save late, and its
  threads then waited five minutes at exit for the folder that never came."""
  directory = str(tmp_path / "checkpoints")
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", READ_ONLY_SAVE, directory, mode],
                          capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "raised: Saving step 2 under" in result.stdout and "Read-only" in result.stdout
  assert "saved: [1, 3]" in result.stdout
  assert time.perf_counter() - start < 120, "the process waited on Orbax's threads at exit"
