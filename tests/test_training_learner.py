"""A stage's learner: its sampler holds none of the weights that the stage's updates donate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaphorstar_jax import sharding
from metaphorstar_jax.training import builders, learner as learner_lib
from metaphorstar_jax.training.state import RunState
from helpers import smoke_default_config


def test_the_samplers_hold_no_weights_the_updates_donate(tmp_path):
  """Defect 6: `nnx.split(model)` in train() and each Sampler's own split shared the same buffers;
  the first update donated them, leaving every sampler holding deleted arrays for any call made
  without `state=`."""
  config = smoke_default_config(tmp_path / "run")
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  processor = builders.build_processor(config)
  task, records, _ = builders.load_data(config)
  model = builders.build_model(config, mesh)
  graphdef, params = nnx.split(model)  # as train() splits it
  stage = config.stages[-1]
  learner = learner_lib.build_learner(config, stage, model, graphdef, params, task, processor,
                                      mesh)
  run = RunState(params=params, opt_state=None, ref_params=None, global_step=0, stage_index=0,
                 stage_step=0)
  learner_lib.start_stage(run, learner, len(config.stages) - 1)
  donated = jax.tree.leaves(run.params)
  run.params, run.opt_state, _ = learner.steps.apply(
      run.params, run.opt_state, jax.tree.map(jnp.zeros_like, run.params))
  assert all(a.is_deleted() for a in donated)  # the update donates: the premise of this test
  held = jax.tree.leaves(learner.sampler.state)
  assert not any(a.is_deleted() for a in held), "the sampler holds arrays an update deleted"

  batch = processor([task.build_conversation(r) for r in records[:2]])
  with pytest.raises(ValueError, match="state="):
    learner.sampler(batch, key=jax.random.key(0))
  rollouts = learner.sampler(batch, key=jax.random.key(0), state=run.params)
  assert np.asarray(rollouts.lengths_B).min() >= 1
