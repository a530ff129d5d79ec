"""What an evaluation samples with and who grades it: the eval sampling settings, the check of
repeats against them, and the LLM judge of open-ended tasks. The evaluation CLI and the trainer's
periodic evaluation (training/evaluation.py) both take them from here."""

from __future__ import annotations

import os

import jax
from absl import logging

from metaphorstar_jax import judge as judge_lib
from metaphorstar_jax import rl
from metaphorstar_jax.sampling import SamplingConfig
from metaphorstar_jax.tasks import Task

SAMPLING_MODES = ("greedy", "validation")
JUDGED_TASKS = ("tfq_osq",)  # tasks whose headline metric is an LLM judge's grade


def sampling_config(config, mode: str | None = None) -> SamplingConfig:
  """Evaluation sampling: "greedy", or "validation" (config.eval.temperature/top_p when set,
  else the RL preset's validation values); None picks greedy iff config.eval.greedy."""
  mode = mode or ("greedy" if config.eval.greedy else "validation")
  if mode not in SAMPLING_MODES:
    raise ValueError(f"Sampling mode {mode!r} is not one of {SAMPLING_MODES}.")
  unset = lambda value, fallback: fallback if value is None else value  # base_config's None
  max_new_tokens = int(unset(config.eval.max_new_tokens, config.rl.max_new_tokens))
  rollout = rl.preset(config.rl.preset).rollout
  temperature = float(unset(config.eval.temperature, rollout.val_temperature))
  top_p = float(unset(config.eval.top_p, rollout.val_top_p))
  if mode == "greedy" or temperature == 0:
    return SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
  return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


def check_repeats(num_samples: int, sampling: SamplingConfig) -> None:
  """ValueError unless `num_samples` >= 1 repeats can differ under `sampling`."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  if num_samples > 1 and sampling.greedy:
    raise ValueError(
        f"num_samples={num_samples} with greedy decoding gives {num_samples} identical runs. "
        "Decoding is greedy with --sampling=greedy, with config.eval.greedy=True and no "
        "--sampling, and also with --sampling=validation when config.eval.temperature resolves "
        "to 0 (unset, it takes the RL preset's validation temperature, 0 for grpo and dapo): "
        "sample with --sampling=validation and --config.eval.temperature=T > 0.")


def make_judge(config, task: Task, output_dir: str | None) -> tuple[judge_lib.Judge | None, str]:
  """(judge or None, why): a judge for judged tasks when one is configured."""
  if task.name not in JUDGED_TASKS:
    return None, "not needed"
  if jax.process_index() != 0:
    return None, "asked by process 0 only"
  values = config.judge.to_dict()
  if not values["cache_path"] and output_dir:
    values["cache_path"] = os.path.join(output_dir, "judge_cache.jsonl")
  judge_config = judge_lib.JudgeConfig.resolve(values)
  if not judge_config.configured:
    logging.warning("Task %s is graded by an LLM judge, but none is configured (config.judge or "
                    "%s/%s); reporting only the rule-based metrics.", task.name,
                    judge_lib.ENV_URL, judge_lib.ENV_MODEL)
    return None, "not configured"
  return judge_lib.Judge(judge_config), f"{judge_config.model} at {judge_config.base_url}"
