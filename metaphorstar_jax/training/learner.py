"""A stage's learner: what its steps use and keep fixed for the whole stage (the run config as
the stage sees it, the RL recipe, the compiled steps, the rollout sampler, task and processor)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.tasks import Task
from metaphorstar_jax.training import memory_budget, step as step_lib
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
  # Each program's share of a chip's memory (None: every program compiles against the whole chip).
  budget: memory_budget.MemoryBudget | None = None


def keeps_reference(stage, objective: Objective) -> bool:
  """Whether the stage keeps a frozen copy of its starting policy (for a KL term)."""
  loss = objective.loss
  return stage.kind == "grpo" and (loss.use_kl_loss or loss.use_kl_in_reward)


def build_learner(config, stage, model, graphdef, params, task, processor, mesh, *,
                  memory_per_chip: float | None = None) -> Learner:
  """`memory_per_chip`: the bytes of each chip, from which each program's memory budget is set
  (training/memory_budget.py); None compiles every program against the whole chip."""
  staged = stage_config(config, stage)
  objective = build_objective(staged)
  tx = stage_optimizer(config, stage, params)
  budget = memory_budget.stage_budget(
      params, step_lib.abstract_optimizer_state(tx, params),
      reference=keeps_reference(stage, objective),
      accumulator=staged.train.grad_accum_steps > 1, headroom=config.memory.hbm_headroom,
      memory_per_chip=memory_per_chip)
  logging.info("%s: %s", stage.name, budget.describe())
  options = memory_budget.options_by_program(budget)
  # keep_weights=False: the run's params are passed to every call, as the updates donate them.
  sampler = Sampler(model, SamplingConfig(
      max_new_tokens=objective.max_new_tokens, temperature=objective.temperature,
      top_p=objective.top_p, top_k=objective.top_k, return_entropy=objective.tree is not None,
      prefill_chunk=staged.train.prefill_chunk),
      mesh=mesh, keep_weights=False, compiler_options=options)
  steps = step_lib.TrainSteps(graphdef, tx, objective.loss, temperature=objective.temperature,
                              logit_chunk=config.train.logit_chunk,
                              frozen=frozen_patterns(config), mesh=mesh, compiler_options=options)
  return Learner(staged, stage, objective, steps, sampler, task, processor, mesh, budget)


def start_stage(run: RunState, learner: Learner, stage_index: int) -> None:
  """Fresh optimizer state, reference policy and KL coefficient for the stage's first step."""
  run.stage_index, run.stage_step = stage_index, 0
  run.opt_state = step_lib.init_optimizer_state(learner.steps.tx, run.params)
  if keeps_reference(learner.stage, learner.objective):
    # A frozen copy of the stage's start, placed exactly like the policy so that the log-prob
    # function compiles once for both.
    run.ref_params = jax.tree.map(lambda a: jax.device_put(jnp.copy(a), a.sharding), run.params)
  else:
    run.ref_params = None
  run.kl_coef = float(learner.objective.loss.kl_coef)
