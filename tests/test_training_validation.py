"""training/validation.py: a config that cannot run is refused before any weight is read, with
the field named."""

from __future__ import annotations

import importlib.util
import os

import pytest

from metaphorstar_jax import config_defaults as common
from metaphorstar_jax import train
from metaphorstar_jax.training import validation

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def base():
  config = common.base_config()
  config.stages = [common.stage("sft", kind="sft", steps=2, learning_rate=1e-5),
                   common.stage("grpo", kind="grpo", steps=3, learning_rate=1e-6)]
  return config


BAD_VALUES = [
    ("stages.0.steps", -3, r"stages\[0\]\.steps=-3"),
    ("stages.1.steps", 0, r"stages\[1\]\.steps=0"),
    ("stages.0.kind", "rlhf", r"stages\[0\]\.kind='rlhf'"),
    ("checkpoint.keep", 0, r"checkpoint\.keep=0"),
    ("rl.group_size", -5, r"rl\.group_size=-5"),
    ("rl.group_size", 0, r"rl\.group_size=0"),
    ("train.num_minibatches", 0, r"train\.num_minibatches=0"),
    ("train.grad_accum_steps", 0, r"train\.grad_accum_steps=0"),
    ("train.prompts_per_step", 0, r"train\.prompts_per_step=0"),
    ("eval.batch_size", 0, r"eval\.batch_size=0"),
    ("model.dtype", "float33", r"model\.dtype='float33'.*bfloat16"),
    ("rl.top_p", 1.5, r"rl\.top_p=1\.5"),
    ("eval.temperature", -0.5, r"eval\.temperature=-0\.5"),
    ("log.every", 0, r"log\.every=0"),
    ("checkpoint.step", -1, r"checkpoint\.step=-1.*unset \(None\) for the newest step"),
    ("plan.image_pixels", 0, r"plan\.image_pixels=0.*unset \(None\) for image\.max_pixels"),
    ("train.gen_prompts_per_step", 0, r"train\.gen_prompts_per_step=0.*unset"),
    ("stages.1.group_size", 0, r"stages\[1\]\.group_size=0.*unset"),
    ("stages.1.prompts_per_step", -1, r"stages\[1\]\.prompts_per_step=-1"),
    ("debug.signal_at_step", -1, r"debug\.signal_at_step=-1"),
    ("plan.images_per_prompt", -1, r"plan\.images_per_prompt=-1"),
    ("memory.hbm_headroom", 1.0, r"memory\.hbm_headroom=1\.0.*\[0, 1\)"),
    ("memory.hbm_headroom", -0.1, r"memory\.hbm_headroom=-0\.1"),
    ("train.prefill_chunk", -1, r"train\.prefill_chunk=-1"),
    ("model.remat_offload", True, r"model\.remat_offload=True.*model\.remat=True"),
]


def set_field(config, path, value):
  *parents, last = path.split(".")
  node = config
  for part in parents:
    node = node[int(part)] if part.isdigit() else node[part]
  node[last] = value


@pytest.mark.parametrize("path,value,message", BAD_VALUES)
def test_out_of_range_values_are_refused_with_the_field_named(path, value, message):
  config = base()
  validation.check_config(config)  # the base is valid: only the change below makes it fail
  set_field(config, path, value)
  with pytest.raises(ValueError, match=message):
    validation.check_config(config)


@pytest.mark.parametrize("path,value,message", [
    ("judge.deadline_s", 0.0, r"judge\.deadline_s=0\.0"),
    ("judge.max_reply_bytes", -1, r"judge\.max_reply_bytes=-1"),
    ("judge.repeats", 0, r"judge\.repeats=0"),
    ("judge.deadline_s", 5.0, r"judge\.deadline_s=5\.0.*timeout_s=60"),
])
def test_judge_bounds_out_of_range_are_refused(path, value, message):
  config = load("tfq_grpo_7b.py", "smoke")
  validation.check_config(config)
  set_field(config, path, value)
  with pytest.raises(ValueError, match=message):
    validation.check_config(config)


def test_a_split_that_does_not_divide_names_the_stage_and_the_parts():
  config = base()
  config.train.prompts_per_step, config.train.num_minibatches = 6, 4
  with pytest.raises(ValueError, match=r"prompts_per_step \(stage grpo\)=6.* 4 parts"):
    validation.check_config(config)


def test_a_prefill_chunk_that_does_not_divide_the_generation_batch_is_refused():
  config = base()
  config.train.prompts_per_step, config.train.prefill_chunk = 6, 4
  with pytest.raises(ValueError, match=r"prefill_chunk \(stage grpo\)=4.* 6 prompts"):
    validation.check_config(config)
  config.train.prefill_chunk = 3
  validation.check_config(config)


def test_one_rollout_per_prompt_warns_that_there_is_no_baseline(caplog):
  config = base()
  config.rl.group_size = 1
  validation.check_config(config)
  assert "no baseline" in caplog.text


def test_paper_configs_and_their_smoke_modes_are_valid():
  for name in ("tfq_grpo_tiny.py", "tfq_grpo_7b.py", "rewardmap_7b.py", "star_r1_7b.py"):
    validation.check_config(load(name))
    validation.check_config(load(name, "smoke"))
  validation.check_config(load("cinema_7b.py", "smoke"))


def test_cinema_cold_start_refuses_to_run_without_its_trajectories():
  config = load("cinema_7b.py")
  with pytest.raises(ValueError, match=r"stages\[0\]\.sft_data.*cold_start"):
    validation.check_config(config)
  config.stages[0].sft_data = "/data/cinema/cold_start.jsonl"
  validation.check_config(config)


def test_train_refuses_before_it_builds_anything(tmp_path, monkeypatch):
  """A bad split on the 7B config is refused before the model is built (it was reported after
  the "before" evaluation)."""
  config = load("tfq_grpo_7b.py")
  config.workdir = str(tmp_path / "run")
  config.train.prompts_per_step = 63
  built = []
  monkeypatch.setattr(train.builders, "build_model", lambda *a: built.append(a))
  with pytest.raises(ValueError, match="prompts_per_step"):
    train.train(config)
  assert not built and not os.path.exists(config.workdir)
