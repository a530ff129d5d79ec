"""Checks of a run config made before any weight is read or program compiled: every number in
its range, every batch split even, every stage's data present. A bad value is an error naming the
field and what would be valid; on a pod that is seconds instead of minutes of allocation."""

from __future__ import annotations

from absl import logging

from metaphorstar_jax import config_defaults
from metaphorstar_jax.training.objective import build_objective, draw_size, stage_config

DTYPES = ("float32", "bfloat16", "float16")
STAGE_KINDS = ("sft", "grpo")

# (field, smallest allowed value): counts a run cannot do without.
AT_LEAST = (
    ("train.prompts_per_step", 1), ("train.ppo_epochs", 1), ("train.num_minibatches", 1),
    ("train.grad_accum_steps", 1), ("train.logit_chunk", 0), ("train.prefill_chunk", 0),
    ("rl.max_new_tokens", 1), ("rl.top_k", 0),
    ("data.max_prompt_tokens", 1), ("data.num_workers", 0),
    ("eval.every", 0), ("eval.batch_size", 1), ("eval.num_samples", 1),
    ("checkpoint.every", 0), ("checkpoint.keep", 1), ("export.every", 0), ("log.every", 1),
    ("optim.max_consecutive_nonfinite", 0),
    ("plan.images_per_prompt", 0),  # 0: text-only prompts
    ("debug.kill_after_checkpoint", 0), ("debug.signal_at_step", 0),
)
# (field, what it must be): the judge's bounds.
JUDGE_POSITIVE = ("judge.repeats", "judge.timeout_s", "judge.deadline_s", "judge.max_reply_bytes")


def _get(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def _is_count(value, low: int) -> bool:
  """Whether `value` is an integer (not a bool) of at least `low`."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _fail(field: str, value, wanted: str) -> None:
  raise ValueError(f"config.{field}={value!r}: {wanted}.")


def check_numbers(config) -> None:
  for field, low in AT_LEAST:
    value = _get(config, field)
    if not _is_count(value, low):
      _fail(field, value, f"must be an integer ≥ {low}")
  for field in ("model.dtype", "model.param_dtype"):
    if _get(config, field) not in DTYPES:
      _fail(field, _get(config, field), f"use one of {', '.join(DTYPES)}")
  # Unset (None) takes the preset's value or another field's (config_defaults.base_config).
  for field, low, fallback in (("rl.group_size", 1, "the RL preset's rollout.n"),
                               ("train.gen_prompts_per_step", 1, "train.prompts_per_step"),
                               ("eval.max_new_tokens", 1, "rl.max_new_tokens"),
                               ("checkpoint.step", 0, "the newest step that restores"),
                               ("plan.image_pixels", 1, "image.max_pixels")):
    value = _get(config, field)
    if value is not None and not _is_count(value, low):
      _fail(field, value, f"use an integer ≥ {low}, or leave it unset (None) for {fallback}")
  for field in ("rl.temperature", "eval.temperature"):
    value = _get(config, field)
    if value is not None and value < 0:
      _fail(field, value, "use a temperature ≥ 0, or leave it unset (None) for the RL preset's")
  for field in ("rl.top_p", "eval.top_p"):
    value = _get(config, field)
    if value is not None and not 0 < value <= 1:
      _fail(field, value, "use a top-p in (0, 1], or leave it unset (None) for the RL preset's")
  if config.model.remat_offload and not config.model.remat:
    _fail("model.remat_offload", True, "it keeps rematerialised layers' saved inputs in host "
          "memory; set model.remat=True too, or remat_offload=False")
  headroom = config.memory.hbm_headroom
  if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
    _fail("memory.hbm_headroom", headroom, "use the fraction of each chip's memory to leave free, "
          "in [0, 1)")
  for field in JUDGE_POSITIVE:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      _fail(field, value, "must be a number > 0")
  if config.judge.deadline_s < config.judge.timeout_s:
    _fail("judge.deadline_s", config.judge.deadline_s,
          f"bounds a whole request, so it must be ≥ judge.timeout_s={config.judge.timeout_s} "
          "(one socket read)")
  if not config.stages:
    _fail("stages", list(config.stages), "a run needs at least one stage")


def check_stage(config, index: int) -> None:
  """One stage: its kind, length and rate, its batch splits, and the data it consumes."""
  stage = config.stages[index]
  name = f"stages[{index}]"
  if stage.kind not in STAGE_KINDS:
    _fail(f"{name}.kind", stage.kind, f"use one of {', '.join(STAGE_KINDS)}")
  if not isinstance(stage.steps, int) or stage.steps < 1:
    _fail(f"{name}.steps", stage.steps, "a stage runs at least one step (remove the stage to "
          "skip it)")
  if not stage.learning_rate >= 0:
    _fail(f"{name}.learning_rate", stage.learning_rate, "must be ≥ 0")
  for field in ("group_size", "prompts_per_step", "gen_prompts_per_step"):
    value = stage[field]
    if value is not None and not _is_count(value, 1):
      _fail(f"{name}.{field}", value, "use an integer ≥ 1, or leave it unset (None) for the "
            "run-wide value")
  if stage.kind == "sft" and stage.sft_data is None:
    _fail(f"{name}.sft_data", None, f"stage {stage.name!r} learns supervised trajectories and "
          f"has no data; pass --config.{name}.sft_data=/path/to/trajectories.jsonl")
  staged = stage_config(config, stage)
  objective = build_objective(staged)  # raises on recipe fields that do not fit together
  train_cfg = staged.train
  parts = train_cfg.grad_accum_steps * (train_cfg.num_minibatches if stage.kind == "grpo" else 1)
  if train_cfg.prompts_per_step % parts:
    split = ("num_minibatches × grad_accum_steps" if stage.kind == "grpo"
             else "grad_accum_steps")
    _fail(f"train.prompts_per_step (stage {stage.name})", train_cfg.prompts_per_step,
          f"must split evenly into {split} = {parts} parts")
  drawn = draw_size(staged, stage, objective)
  chunk = train_cfg.prefill_chunk
  if stage.kind == "grpo" and chunk and drawn > chunk and drawn % chunk:
    _fail(f"train.prefill_chunk (stage {stage.name})", chunk,
          f"must divide the generation batch of {drawn} prompts (or be 0: no chunks)")
  if stage.kind == "grpo" and objective.group_size < 2:
    logging.warning("Stage %s draws one rollout per prompt (group_size=%d): group advantages "
                    "then have no baseline, and every advantage is 0 under z-score or mean "
                    "baselines.", stage.name, objective.group_size)


def check_stage_fields(config) -> None:
  """Every stage has exactly config_defaults.STAGE_FIELDS (a stage built without
  config_defaults.stage, or a field added to one, is refused naming the closest field)."""
  for index, stage in enumerate(config.stages):
    for key in stage.keys():
      if key not in config_defaults.STAGE_FIELDS:
        _fail(f"stages[{index}].{key}", stage[key], "a stage has no such field"
              f"{config_defaults.closest_name_hint(key, config_defaults.STAGE_FIELDS)}; its "
              f"fields are {', '.join(config_defaults.STAGE_FIELDS)}")
    missing = [key for key in config_defaults.STAGE_FIELDS if key not in stage]
    if missing:
      _fail(f"stages[{index}]", stage.to_dict(), f"lacks {', '.join(missing)}; build stages with "
            "config_defaults.stage()")


def check_config(config) -> None:
  """Every check above; raises ValueError naming the first bad field."""
  check_stage_fields(config)
  config_defaults.check_dict_keys(config)
  check_numbers(config)
  for index in range(len(config.stages)):
    check_stage(config, index)
