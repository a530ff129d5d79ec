"""A stage's learner: what its steps use and keep fixed for the whole stage (the run config as
the stage sees it, the RL recipe, the compiled steps, the rollout sampler, task and processor)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.tasks import Task
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.builders import frozen_patterns, stage_optimizer
from metaphorstar_jax.training.objective import Objective, build_objective, stage_config
from metaphorstar_jax.training.state import RunState


@dataclasses.dataclass
class Learner:
  config: ml_collections.ConfigDict  # the run config as this stage sees it (stage_config)
  stage: ml_collections.ConfigDict  # its entry of config.stages
  objective: Objective
  steps: step_lib.TrainSteps
  sampler: Sampler  # draws the stage's rollouts at the recipe's temperature
  task: Task
  processor: Any
  mesh: Any


def build_learner(config, stage, model, graphdef, params, task, processor, mesh) -> Learner:
  staged = stage_config(config, stage)
  objective = build_objective(staged)
  # keep_weights=False: the run's params are passed to every call, as the updates donate them.
  sampler = Sampler(model, SamplingConfig(
      max_new_tokens=objective.max_new_tokens, temperature=objective.temperature,
      top_p=objective.top_p, top_k=objective.top_k, return_entropy=objective.tree is not None),
      mesh=mesh, keep_weights=False)
  steps = step_lib.TrainSteps(graphdef, stage_optimizer(config, stage, params), objective.loss,
                              temperature=objective.temperature,
                              logit_chunk=config.train.logit_chunk,
                              frozen=frozen_patterns(config), mesh=mesh)
  return Learner(staged, stage, objective, steps, sampler, task, processor, mesh)


def start_stage(run: RunState, learner: Learner, stage_index: int) -> None:
  """Fresh optimizer state, reference policy and KL coefficient for the stage's first step."""
  loss = learner.objective.loss
  run.stage_index, run.stage_step = stage_index, 0
  run.opt_state = step_lib.init_optimizer_state(learner.steps.tx, run.params)
  if learner.stage.kind == "grpo" and (loss.use_kl_loss or loss.use_kl_in_reward):
    # A frozen copy of the stage's start, placed exactly like the policy so that the log-prob
    # function compiles once for both.
    run.ref_params = jax.tree.map(lambda a: jax.device_put(jnp.copy(a), a.sharding), run.params)
  else:
    run.ref_params = None
  run.kl_coef = float(loss.kl_coef)
