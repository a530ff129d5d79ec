"""The Orbax checkpointer: a save Orbax declines or fails is an error naming its step, damaged
files are found on restore, and a resumed run passes over a damaged step to an older one."""

import glob
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

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


def arrays_of(scale: float) -> dict:
  """A small tree like a run's: float parameters big enough to span a data file, counters."""
  return {"params": {"kernel": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) * scale,
                     "bias": jnp.full((8,), scale, jnp.bfloat16)},
          "opt_state": {"count": jnp.int32(3), "finite": jnp.array(True)}}


def saved_run(directory, steps=(1, 2, 3), async_save=False):
  with checkpoints.Checkpointer(directory, async_save=async_save) as ckpt:
    for step in steps:
      ckpt.save(step, arrays_of(step), {"position": step}, {"stage_index": 0, "step": step},
                {"config": {"seed": 0}})


def largest_data_file(directory, step):
  files = glob.glob(os.path.join(directory, str(step), "arrays", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def test_a_flipped_byte_in_a_data_file_refuses_to_restore(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory, steps=(1,))
  path = largest_data_file(directory, 1)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match="Step 1 .* damaged.*params/kernel"):
      ckpt.restore(1, arrays_of(1))


@pytest.mark.parametrize("damage", ["metadata deleted", "data file truncated",
                                    "data file deleted"])
def test_resumption_passes_over_a_damaged_latest_step(tmp_path, damage, caplog):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  if damage == "metadata deleted":
    os.remove(os.path.join(directory, "3", "meta", "metadata"))
  elif damage == "data file truncated":
    path = largest_data_file(directory, 3)
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    os.remove(largest_data_file(directory, 3))
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    resume = checkpoints.Resumption.find(ckpt)
    arrays, data_state, meta = resume.restore(arrays_of(0), stage_index=0)
    assert resume.step == 2 and meta["step"] == 2 and data_state == {"position": 2}
    np.testing.assert_array_equal(np.asarray(arrays["params"]["kernel"]),
                                  np.asarray(arrays_of(2)["params"]["kernel"]))
    assert [step for step, _ in resume.skipped] == [3]
    assert "Resuming from step 2; passed over: step 3" in caplog.text
    # The damaged step is moved aside, so that the resumed run's step 3 can be saved.
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, arrays_of(3), {}, {"stage_index": 0, "step": 3})
  assert os.listdir(str(tmp_path / "checkpoints.set_aside"))[0].startswith("3.")


def test_a_named_step_is_restored_or_refused_never_swapped(tmp_path):
  directory = str(tmp_path / "checkpoints")
  saved_run(directory)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(ValueError, match=r"checkpoint.step=7.*saved steps: \[1, 2, 3\]"):
      checkpoints.Resumption.find(ckpt, 7)
    resume = checkpoints.Resumption.find(ckpt, 1)
    _, data_state, _ = resume.restore(arrays_of(0), stage_index=0)
    assert data_state == {"position": 1} and ckpt.all_steps() == [1]
  os.truncate(largest_data_file(directory, 1), 10)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match="No checkpoint .* restores.*step 1"):
      checkpoints.Resumption.find(ckpt, 1).restore(arrays_of(0), stage_index=0)


def test_non_finite_parameters_are_never_saved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  arrays = arrays_of(1)
  arrays["params"]["kernel"] = arrays["params"]["kernel"].at[3, 4].set(jnp.nan)
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(1, arrays_of(1), {}, {})
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
