"""Every config in configs/ builds a valid objective (per stage too), in full and smoke mode, and
the paper configs hold the numbers of specs/seed_methods.md."""

import glob
import importlib.util
import inspect
import os

import ml_collections
import pytest

from metaphorstar_jax import config_defaults as common, evaluate, rl, train
from metaphorstar_jax.training import evaluation_setup, objective as objective_lib
from metaphorstar_jax.tasks import get_task

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
STAGE_KINDS = ("sft", "grpo")


def load(name_or_path, smoke=False):
  path = name_or_path if os.path.isabs(name_or_path) else os.path.join(CONFIG_DIR, name_or_path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if "smoke" in inspect.signature(module.get_config).parameters:
    return module.get_config(smoke=smoke)
  return module.get_config()


stage_config = objective_lib.stage_config


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"tfq_grpo_tiny.py", "tfq_grpo_3b.py", "tfq_grpo_7b.py", "tfq_grpo_32b.py",
          "rewardmap_7b.py", "star_r1_7b.py", "cinema_7b.py"} <= names


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_builds_valid_objectives(path, smoke):
  config = load(path, smoke)
  objective_lib.build_objective(config)
  evaluation_setup.sampling_config(config)
  get_task(config.data.task, **dict(config.data.task_options))
  assert config.stages, "a config needs at least one stage"
  for stage in config.stages:
    assert stage.kind in STAGE_KINDS, stage.kind
    assert set(stage.keys()) == set(common.STAGE_FIELDS), set(stage.keys())
    assert stage.steps > 0 and stage.learning_rate > 0
    staged = stage_config(config, stage)
    objective = objective_lib.build_objective(staged)
    prompts = staged.train.prompts_per_step
    if stage.kind == "grpo":
      assert objective.group_size >= 2, "GRPO needs at least two samples per prompt"
      parts = staged.train.num_minibatches * staged.train.grad_accum_steps
      assert prompts % parts == 0, (prompts, parts)
      if objective.loss.overlong_buffer:
        assert objective.loss.overlong_buffer_len < objective.max_new_tokens
      if stage.tree_rollout:
        tree = stage.tree_rollout
        assert tree.num_roots * (1 + tree.branches) == objective.group_size
      if stage.gen_prompts_per_step is not None:
        assert stage.gen_prompts_per_step >= prompts
    else:
      assert prompts % staged.train.grad_accum_steps == 0
  if smoke:
    assert config.model.preset == "tiny" and not config.model.hf_path
    assert all(s.steps <= 2 for s in config.stages)


@pytest.mark.parametrize("size", ["3b", "7b", "32b"])
def test_metaphorstar_numbers(size):
  config = load(f"tfq_grpo_{size}.py")
  objective = objective_lib.build_objective(config)
  loss = objective.loss
  assert config.model.preset == size  # §1.3
  assert config.rl.preset == "metaphorstar"
  assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == (0.2, 0.3, 3.0)  # §1.3
  assert loss.use_kl_loss and loss.kl_loss_type == "low_var_kl" and loss.kl_loss_coef == 1e-2
  assert loss.loss_agg_mode == "token-mean" and not loss.use_kl_in_reward  # §1.3
  assert (objective.group_size, objective.temperature, objective.top_p) == (5, 1.0, 0.99)  # §1.4
  assert objective.max_new_tokens == 2048 and config.data.max_prompt_tokens == 5500  # §1.4
  assert (config.image.min_pixels, config.image.max_pixels) == (512 ** 2, 2048 ** 2)  # §1.4
  assert config.train.prompts_per_step == 64  # §1.4 rollout_batch_size
  assert config.train.prompts_per_step // config.train.num_minibatches == 32  # §1.4 global batch
  assert config.train.ppo_epochs == 1
  [stage] = config.stages  # §1.3: no SFT
  assert (stage.kind, stage.steps, stage.learning_rate, stage.warmup_steps) == (
      "grpo", 75, 1e-6, 0)  # §1.4: 5 epochs × 15 steps
  assert config.optim.schedule == "constant" and config.optim.weight_decay == 1e-2  # §1.4
  assert config.optim.grad_clip_norm == 1.0
  assert config.model.remat and not config.model.freeze_vision  # §1.4
  assert (config.eval.every, config.checkpoint.every, config.checkpoint.keep) == (5, 5, 3)
  assert config.data.task == "tfq" and get_task("tfq").options.format_weight == 0.5  # §1.6
  sampling = evaluation_setup.sampling_config(config)
  assert (sampling.greedy, sampling.temperature, sampling.top_p) == (False, 0.5, 0.9)  # §1.8
  assert config.judge.model == "gpt-4o-2024-11-20" and config.judge.repeats >= 3  # §1.8
  assert (config.judge.temperature, config.judge.top_p) == (0.0, 0.9)  # §1.8
  assert rl.preset("metaphorstar").rollout.val_temperature == 0.5  # §1.4 validation


def test_rewardmap_numbers():
  config = load("rewardmap_7b.py")
  objective = objective_lib.build_objective(config)
  loss = objective.loss
  assert config.model.preset == "7b" and config.data.task == "reasonmap"  # §2.3
  assert objective.group_size == 4 and (objective.temperature, objective.top_p) == (1.0, 1.0)
  assert loss.adv_estimator == "grpo" and loss.norm_adv_by_std_in_grpo  # §2.3 z-score
  assert loss.use_kl_loss and loss.kl_loss_coef == 1e-2 and not loss.use_kl_in_reward  # §2.3
  assert loss.entropy_coeff == 1e-3  # §2.3
  assert (loss.clip_ratio_low, loss.clip_ratio_high) == (0.2, 0.2)  # §2.3
  assert config.train.prompts_per_step == 16 and config.train.num_minibatches == 1  # §2.3
  assert config.stages[0].learning_rate == 1e-6 and config.optim.weight_decay == 1e-2  # §2.3
  assert config.data.max_prompt_tokens == 20000 and objective.max_new_tokens == 2048  # §2.3
  assert (config.image.min_pixels, config.image.max_pixels) == (3136, 128450560)  # §2.3
  assert config.eval.every == 0 and config.checkpoint.every == 100  # §2.3
  task = get_task("reasonmap", **dict(config.data.task_options))
  assert task.options.curriculum == "rewardmap" and not task.shuffle  # §2.4
  assert task.options.difficulty_aware and task.options.format_bonus == 0.0  # §2.5


def test_star_r1_numbers():
  config = load("star_r1_7b.py")
  assert [s.kind for s in config.stages] == ["grpo"]  # §3.3: single-stage RL, no SFT
  options = get_task("tvr", **dict(config.data.task_options)).options
  assert (options.full_match, options.index_attribute_match, options.index_match) == (
      5.0, 1.5, 0.5)  # §3.3
  assert options.format_weight == 1.0  # §3.3: R = R_format + R_acc
  assert config.image.max_pixels == 320 * 240  # §3.2
  assert config.model.preset == "7b"  # §3.1


def test_cinema_stages_and_numbers():
  config = load("cinema_7b.py")
  cold, explore, dapo = config.stages
  assert [s.kind for s in config.stages] == ["sft", "grpo", "grpo"]  # §4.2
  assert explore.steps == 300  # §4.3: stage 2 starts from stage 1's step 300
  tree = explore.tree_rollout
  assert (tree.num_roots, tree.branches, tree.entropy_top_k) == (4, 3, 20)  # §4.3
  # The exploration stage runs tree rollouts; the DAPO stage draws 16 independent rollouts.
  assert objective_lib.build_objective(stage_config(config, explore)).tree == rl.TreeRollout(
      num_roots=4, branches=3, entropy_top_k=20, min_token_chars=2)
  assert objective_lib.build_objective(stage_config(config, dapo)).tree is None
  for stage in (explore, dapo):
    staged = stage_config(config, stage)
    objective = objective_lib.build_objective(staged)
    loss = objective.loss
    assert stage.rl_preset == "dapo" and objective.group_size == 16  # §4.3
    assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert not loss.use_kl_loss and not loss.use_kl_in_reward and loss.entropy_coeff == 0.0
    assert loss.filter_groups and loss.max_num_gen_batches == 10  # §4.3
    assert loss.overlong_buffer and loss.overlong_buffer_len == 512  # §4.3
    assert loss.overlong_penalty_factor == 1.0 and loss.loss_agg_mode == "token-mean"
    assert (stage.learning_rate, stage.warmup_steps) == (1e-6, 10)  # §4.3
    assert (stage.prompts_per_step, stage.gen_prompts_per_step) == (512, 1024)  # §4.3
    assert (objective.temperature, objective.top_p) == (1.0, 1.0)  # §4.3
  assert config.train.prompts_per_step // config.train.num_minibatches == 32  # §4.3 mini-batch
  assert config.optim.weight_decay == 0.1 and config.optim.grad_clip_norm == 1.0  # §4.3
  assert cold.sft_data is None  # required: the run refuses to start without it


def test_tfq_sizes_share_one_smoke_run():
  """The 3B and 32B smoke runs are the 7B's field for field (sizes shrink to the same tiny
  model), so training the 7B smoke config below runs all three."""
  seven = flat_fields(load("tfq_grpo_7b.py", smoke=True))
  for name in ("tfq_grpo_3b.py", "tfq_grpo_32b.py"):
    other = flat_fields(load(name, smoke=True))
    assert {k: v for k, v in other.items() if k != "workdir"} == {
        k: v for k, v in seven.items() if k != "workdir"}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tfq_grpo_7b.py", "rewardmap_7b.py", "star_r1_7b.py",
                                  "cinema_7b.py"])
def test_task_config_trains_a_few_steps_on_its_miniature_and_evaluates(name, tmp_path):
  """The paper's switches (remat, bf16 compute, its batching structure) train, checkpoint, and
  the checkpoint restores into the evaluation CLI."""
  config = load(name, smoke=True)
  assert config.model.remat and config.model.dtype == "bfloat16"
  config.workdir = str(tmp_path / "run")
  config.log.progress_bar = False
  config.checkpoint.async_save = False
  results = train.train(config)
  assert any(k.startswith("after ") for k in results)
  assert all(v == v for v in results["last"].values())  # no NaN
  assert "loss" in results["last"] or "sft_loss" in results["last"]
  result = evaluate.cli(["evaluate", f"--config={os.path.join(CONFIG_DIR, name)}:smoke",
                         f"--checkpoint={config.workdir}",
                         f"--output_dir={tmp_path / 'eval'}"])
  assert result["metrics"]
  table = (tmp_path / "eval" / "results.md").read_text()
  assert table.count("|") > 4


PAPER_CONFIGS = ["tfq_grpo_3b.py", "tfq_grpo_7b.py", "tfq_grpo_32b.py", "rewardmap_7b.py",
                 "star_r1_7b.py", "cinema_7b.py"]


def flat_fields(value, prefix=""):
  """{'a.b.0.c': leaf} over nested dicts and lists (stages are a list)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    items = value.items()
  elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (dict,
                                                                        ml_collections.ConfigDict)):
    items = enumerate(value)
  else:
    return {prefix: value}
  flat = {}
  for key, child in items:
    flat.update(flat_fields(child, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def matches(path, patterns):
  """Whether `path` is one of `patterns` (`*` for a stage index) or lies below one."""
  for pattern in patterns:
    pattern_parts, parts = pattern.split("."), path.split(".")
    if len(parts) >= len(pattern_parts) and all(
        want in ("*", got) for want, got in zip(pattern_parts, parts)):
      return True
  return False


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_smoke_mode_changes_only_sizes_and_the_switches_it_names(name):
  """Every field a smoke run changes is a size of config_defaults.SMOKE_SIZE_FIELDS or a switch
  of SMOKE_SWITCHES_OFF (with its reason); remat, dtypes, KL placement, tree rollouts and the
  rest keep the paper's values, so CI's smoke runs execute the paper's code paths."""
  full, smoke = flat_fields(load(name)), flat_fields(load(name, smoke=True))
  assert set(smoke) == set(full), set(smoke) ^ set(full)
  allowed = common.SMOKE_SIZE_FIELDS + tuple(common.SMOKE_SWITCHES_OFF)
  changed = {path: (full[path], smoke[path]) for path in full if full[path] != smoke[path]}
  unexplained = {path: values for path, values in changed.items() if not matches(path, allowed)}
  assert not unexplained, f"smoke mode changes switches that select code: {unexplained}"
  assert all(len(reason) > 20 for reason in common.SMOKE_SWITCHES_OFF.values())
  # The micro-batch and mini-batch structure survives, with a batch that divides.
  for field in ("num_minibatches", "grad_accum_steps"):
    assert (smoke[f"train.{field}"] > 1) == (full[f"train.{field}"] > 1), field
  assert (smoke["train.logit_chunk"] > 0) == (full["train.logit_chunk"] > 0)
  assert smoke["train.logit_chunk"] < smoke["rl.max_new_tokens"] or not full["train.logit_chunk"]
  parts = smoke["train.num_minibatches"] * smoke["train.grad_accum_steps"]
  assert smoke["train.prompts_per_step"] % parts == 0
  assert smoke["model.remat"] == full["model.remat"] is True
  assert smoke["model.dtype"] == full["model.dtype"] == "bfloat16"


def test_a_dict_override_merges_into_the_config_files_dict(caplog):
  """`--config.rl.overrides="{...}"` replaced the file's whole dict (ml_collections' rule): the
  tiny config's KL settings were lost. Now the given keys win and the file's others stay."""
  from absl import flags
  from ml_collections import config_flags

  from metaphorstar_jax import config_files
  def parsed(*args):
    argv = ["prog", *args]
    fv = flags.FlagValues()  # sys_argv: ml_collections defines the --config.* flags from it
    config_flags.DEFINE_config_file("config", config_files.path(), flag_values=fv, sys_argv=argv)
    return config_files.parse_flags(fv, argv)

  fv = parsed("--config.rl.overrides={'clip_ratio_high': 0.28}", "--config.seed=3")
  tiny = load("tfq_grpo_tiny.py")
  assert tiny.rl.overrides and "clip_ratio_high" not in tiny.rl.overrides
  assert dict(fv["config"].value.rl.overrides) == {**dict(tiny.rl.overrides),
                                                   "clip_ratio_high": 0.28}
  assert fv["config"].value.seed == 3
  assert "keeps" in caplog.text and "use_kl_loss" in caplog.text
  # A given key replaces the file's value.
  fv = parsed("--config.rl.overrides={'kl_loss_coef': 0.5}")
  assert fv["config"].value.rl.overrides.kl_loss_coef == 0.5
