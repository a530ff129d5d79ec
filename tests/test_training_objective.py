"""A stage's RL recipe: the preset's loss with the overrides, unset sampling fields from the
preset, tree rollouts that set the group size, a stage's fields over the run's, and DAPO's
generation batch only with dynamic sampling."""

import pytest

from metaphorstar_jax import config_defaults, rl
from metaphorstar_jax.training import objective as objective_lib


def grpo_stage(**fields):
  return config_defaults.stage("grpo", kind="grpo", steps=2, learning_rate=1e-6, **fields)


def test_unset_sampling_fields_take_the_presets_and_overrides_replace_loss_fields():
  config = config_defaults.base_config()
  config.rl.preset = "metaphorstar"
  config.rl.overrides = {"clip_ratio_high": 0.31}
  objective = objective_lib.build_objective(config)
  recipe = rl.preset("metaphorstar")
  assert objective.loss == recipe.loss.replace(clip_ratio_high=0.31) != recipe.loss
  assert objective.rollout == recipe.rollout and objective.tree is None
  assert (objective.group_size, objective.temperature, objective.top_p) == (
      recipe.rollout.n, recipe.rollout.temperature, recipe.rollout.top_p)
  assert objective.max_new_tokens == config.rl.max_new_tokens
  config.rl.group_size, config.rl.temperature, config.rl.top_p = 3, 0.7, 0.5
  objective = objective_lib.build_objective(config)
  assert (objective.group_size, objective.temperature, objective.top_p) == (3, 0.7, 0.5)


def test_a_tree_rollout_sets_the_group_size_and_must_agree_with_a_set_one():
  config = config_defaults.base_config()
  config.rl.tree_rollout = {"num_roots": 2, "branches": 3}
  objective = objective_lib.build_objective(config)
  assert objective.tree == rl.TreeRollout(num_roots=2, branches=3)
  assert objective.group_size == objective.tree.group_size == 2 * (1 + 3)
  config.rl.group_size = 5
  with pytest.raises(ValueError, match="groups of num_roots·\\(1 \\+ branches\\) = 8 rollouts, "
                                       "but group_size is 5"):
    objective_lib.build_objective(config)
  config.rl.group_size = None
  config.rl.tree_rollout = {"num_root": 2}
  with pytest.raises(ValueError, match="config.rl.tree_rollout has no key 'num_root' "
                                       "\\(did you mean 'num_roots'\\?\\): its keys are "
                                       "rl.TreeRollout fields"):
    objective_lib.build_objective(config)


def test_a_stages_set_fields_replace_the_runs_and_its_overrides_merge_over_them():
  config = config_defaults.base_config()
  config.rl.overrides = {"clip_ratio_high": 0.31, "kl_coef": 0.01}
  config.train.prompts_per_step = 8
  unchanged = objective_lib.stage_config(config, grpo_stage())
  assert unchanged.to_dict() == config.to_dict()
  staged = objective_lib.stage_config(config, grpo_stage(
      rl_preset="dapo", rl_overrides={"kl_coef": 0.0}, group_size=4, prompts_per_step=2,
      gen_prompts_per_step=6, tree_rollout={"num_roots": 1, "branches": 1}))
  assert staged.rl.preset == "dapo" and staged.rl.group_size == 4
  assert dict(staged.rl.overrides) == {"clip_ratio_high": 0.31, "kl_coef": 0.0}
  assert dict(staged.rl.tree_rollout) == {"num_roots": 1, "branches": 1}
  assert (staged.train.prompts_per_step, staged.train.gen_prompts_per_step) == (2, 6)
  assert config.rl.preset == "metaphorstar" and config.train.prompts_per_step == 8  # untouched
  with pytest.raises(AttributeError):  # locked like the run config: a typo is an error
    staged.rl.group_sise = 3


def test_draw_size_is_the_generation_batch_only_for_dynamic_sampling_grpo():
  config = config_defaults.base_config()
  config.train.prompts_per_step, config.train.gen_prompts_per_step = 4, 12
  sft = config_defaults.stage("warmup", kind="sft", steps=1, learning_rate=1e-5)
  plain = objective_lib.build_objective(config)
  assert objective_lib.draw_size(config, sft, plain) == 4
  with pytest.raises(ValueError, match="gen_prompts_per_step=12 but prompts_per_step=4.*"
                                       "filter_groups=True"):
    objective_lib.draw_size(config, grpo_stage(), plain)
  config.rl.overrides = {"filter_groups": True}
  dapo = objective_lib.build_objective(config)
  assert objective_lib.draw_size(config, grpo_stage(), dapo) == 12
  config.train.gen_prompts_per_step = None
  assert objective_lib.draw_size(config, grpo_stage(), plain) == 4
