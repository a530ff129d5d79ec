"""The Orbax checkpointer: a save Orbax declines is an error, not a log line."""

import jax.numpy as jnp
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
