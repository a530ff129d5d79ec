"""One locked config schema (config_defaults): every shipped config loads locked, with every stage
field declared; a misspelt field or key, in a config file, in code or on a command line, is an
error naming the closest valid one, and a command line reports it in one line, not a traceback."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import app, flags

from metaphorstar_jax import config_defaults as common
from metaphorstar_jax import config_files
from metaphorstar_jax.training import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path, smoke=False):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(smoke=True) if smoke else module.get_config()


def config_dicts(config, path="config"):
  """(path, ConfigDict) of `config` and of every ConfigDict below it, stages included."""
  yield path, config
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from config_dicts(value, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
      for index, item in enumerate(value):
        if isinstance(item, ml_collections.ConfigDict):
          yield from config_dicts(item, f"{path}.{key}[{index}]")


DICT_FIELDS = ("overrides", "tree_rollout", "task_options", "eval_task_options", "rl_overrides")


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_shipped_config_loads_locked_with_the_base_fields(path, smoke):
  config = load(path, smoke)
  base = common.base_config()
  assert set(config.keys()) == set(base.keys())  # no config adds a section
  for name, node in config_dicts(config):
    if name.rsplit(".", 1)[-1].split("[")[0] in DICT_FIELDS:
      continue  # free-form dicts, checked against their own schemas (check_dict_keys)
    assert node.is_locked, name
  for stage in config.stages:
    assert set(stage.keys()) == set(common.STAGE_FIELDS)
  with pytest.raises(AttributeError, match="group_size"):
    config.rl.grop_size = 8
  with pytest.raises(AttributeError, match="group_size"):
    config.stages[0].grop_size = 8


def test_unset_is_the_one_convention_for_the_presets_value():
  config = common.base_config()
  assert (config.rl.group_size, config.rl.temperature, config.rl.top_p) == (None, None, None)
  assert config.train.gen_prompts_per_step is None
  stage = common.stage("grpo", kind="grpo", steps=1, learning_rate=1e-6)
  for field in ("rl_preset", "group_size", "prompts_per_step", "gen_prompts_per_step"):
    assert stage[field] is None, field
  config.rl.group_size = -1  # the old sentinel is now an out-of-range group
  with pytest.raises(ValueError, match=r"rl\.group_size=-1.*unset"):
    validation.check_config(config)


def test_an_unknown_stage_field_is_refused_naming_the_closest():
  with pytest.raises(ValueError, match=r"'grop_size' \(did you mean 'group_size'\?\)"):
    common.stage("grpo", kind="grpo", steps=1, learning_rate=1e-6, grop_size=4)
  config = common.base_config()
  # A stage built by hand, around config_defaults.stage, is refused by validation too.
  config.stages = [ml_collections.ConfigDict(dict(config.stages[0].to_dict(), grop_size=4))]
  with pytest.raises(ValueError, match=r"stages\[0\]\.grop_size.*did you mean 'group_size'"):
    validation.check_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("rl.overrides", {"clip_ratio_hgh": 0.3}, r"rl\.overrides.*'clip_ratio_high'"),
    ("rl.tree_rollout", {"num_rots": 2, "branches": 1}, r"rl\.tree_rollout.*'num_roots'"),
    ("data.task_options", {"num_recrds": 8}, r"data\.task_options.*'num_records'"),
])
def test_an_unknown_key_of_a_dict_field_is_refused_naming_the_closest(field, value, message):
  config = common.base_config()
  validation.check_config(config)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    validation.check_config(config)


def parse(*args):
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_files.define_config_flag("config", config_files.path(), "a config", flag_values=fv,
                                  sys_argv=argv)
  return config_files.parse_flags(fv, argv)


@pytest.mark.parametrize("args,message", [
    (["--config.rl.grop_size=8"], r"'rl\.grop_size' \(did you mean 'rl\.group_size'\?\)"),
    (["--config.stages[1].grop_size=8"], r"did you mean 'stages\[1\]\.group_size'"),
    (["--config.stages[7].steps=1"], r"config\.stages has 2 entries"),
    (["--config.rl.overrides.clip_ratio_hgh=0.3"], r"no key 'clip_ratio_hgh'.*'clip_ratio_high'"),
    (["--config.rl.overrides={'clip_ratio_hgh': 0.3}"], r"'clip_ratio_hgh'.*'clip_ratio_high'"),
    ([f"--config={config_files.path('cinema_7b')}", "--config.stages[1].tree_rollout.num_rots=2"],
     r"'num_rots'.*'num_roots'"),
])
def test_a_misspelt_override_is_a_usage_error_naming_the_closest_field(args, message):
  with pytest.raises(app.UsageError, match=message):
    parse(*args)
  assert parse("--config.rl.group_size=8")["config"].value.rl.group_size == 8  # spelt right


def test_the_training_command_line_reports_a_misspelt_field_in_one_line():
  """`python -m metaphorstar_jax.train --config.rl.grop_size=8` died in an AttributeError
  traceback from ml_collections, raised while train.py was being imported."""
  result = subprocess.run([sys.executable, "-m", "metaphorstar_jax.train",
                           "--config.rl.grop_size=8"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode != 0
  assert "Traceback" not in output, output
  assert "did you mean 'rl.group_size'?" in output, output


def test_evaluation_fields_and_the_warm_start_targets_follow_the_schema():
  config = common.base_config()
  assert (config.eval.temperature, config.eval.top_p, config.eval.max_new_tokens) == (
      None, None, None)  # the RL preset's validation values, and rl.max_new_tokens
  assert "sft_targets" in config and "warmup" not in config
  config.eval.max_new_tokens = -1
  with pytest.raises(ValueError, match=r"eval\.max_new_tokens=-1.*unset"):
    validation.check_config(config)


def test_the_evaluation_command_line_reports_a_misspelt_field_as_a_usage_error():
  from metaphorstar_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match=r"did you mean 'eval\.temperature'\?"):
    evaluate.cli(["evaluate", "--config.eval.temprature=0.5"])
