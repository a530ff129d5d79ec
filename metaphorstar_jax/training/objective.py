"""A stage's RL recipe: the loss and sampling knobs resolved from `rl.preset` and the config's
overrides, and the run config as one stage sees it."""

from __future__ import annotations

import dataclasses

import ml_collections

from metaphorstar_jax import config_defaults, rl


@dataclasses.dataclass
class Objective:
  """The RL recipe of a stage: loss knobs and sampling knobs, resolved from preset + overrides."""

  loss: rl.LossConfig
  rollout: rl.RolloutConfig
  group_size: int
  temperature: float
  top_p: float
  top_k: int
  max_new_tokens: int
  tree: rl.TreeRollout | None = None  # entropy-branched groups (CURE / CINEMA exploration)


def build_objective(config) -> Objective:
  """The recipe of `config.rl` (a run config, or one stage's view of it from stage_config): the
  preset's loss and rollout with rl.overrides applied; unset sampling fields take the preset's."""
  recipe = rl.preset(config.rl.preset)
  loss = recipe.loss.replace(**dict(config.rl.overrides))
  pick = lambda value, preset: preset if value is None else value
  group_size = int(pick(config.rl.group_size, recipe.rollout.n))
  tree = None
  if config.rl.tree_rollout:
    config_defaults.check_dict_keys(config, paths=("rl.tree_rollout",))
    tree = rl.TreeRollout(**dict(config.rl.tree_rollout))
    if config.rl.group_size is not None and group_size != tree.group_size:
      raise ValueError(f"tree_rollout makes groups of num_roots·(1 + branches) = "
                       f"{tree.group_size} rollouts, but group_size is {group_size}; make them "
                       "agree (or leave group_size unset).")
    group_size = tree.group_size
  return Objective(
      loss=loss, rollout=recipe.rollout, group_size=group_size, tree=tree,
      temperature=float(pick(config.rl.temperature, recipe.rollout.temperature)),
      top_p=float(pick(config.rl.top_p, recipe.rollout.top_p)),
      top_k=int(config.rl.top_k),
      max_new_tokens=int(config.rl.max_new_tokens))


def stage_config(config, stage) -> ml_collections.ConfigDict:
  """The run config as `stage` sees it: the stage's fields that are set (config_defaults
  .STAGE_FIELDS: rl_preset, rl_overrides, group_size, tree_rollout, prompts_per_step,
  gen_prompts_per_step) replace the run-wide values. Locked, like the run config."""
  staged = ml_collections.ConfigDict(config.to_dict())
  if stage.rl_preset is not None:
    staged.rl.preset = stage.rl_preset
  staged.rl.overrides = {**dict(config.rl.overrides), **dict(stage.rl_overrides)}
  if stage.group_size is not None:
    staged.rl.group_size = stage.group_size
  if stage.tree_rollout:
    staged.rl.tree_rollout = dict(stage.tree_rollout)
  if stage.prompts_per_step is not None:
    staged.train.prompts_per_step = stage.prompts_per_step
  if stage.gen_prompts_per_step is not None:
    staged.train.gen_prompts_per_step = stage.gen_prompts_per_step
  staged.lock()
  return staged


def draw_size(staged, stage, objective: Objective) -> int:
  """Prompts per generation batch: DAPO's gen_prompts_per_step for a dynamic-sampling GRPO
  stage (verl `data.gen_batch_size`), else prompts_per_step."""
  train_cfg = staged.train
  if stage.kind != "grpo":
    return train_cfg.prompts_per_step
  size = train_cfg.prompts_per_step
  if train_cfg.gen_prompts_per_step is not None:
    size = train_cfg.gen_prompts_per_step
  if size != train_cfg.prompts_per_step and not objective.loss.filter_groups:
    raise ValueError(f"Stage {stage.name} sets gen_prompts_per_step={size} but "
                     f"prompts_per_step={train_cfg.prompts_per_step}; a separate generation "
                     "batch only makes sense with dynamic sampling (rl filter_groups=True).")
  return size
