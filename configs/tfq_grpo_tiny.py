"""The embedded default: a tiny Qwen2.5-VL trained from scratch on the built-in shapes task, on CPU.

Stage 1 teaches only MetaphorStar's <think>/<answer> format on targets whose answers are random;
stage 2 is GRPO with MetaphorStar's objective. Held-out accuracy is printed before and after GRPO.

    python -m metaphorstar_jax.train                                  # this config
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_tiny.py --config.stages.1.steps=50
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.workdir = "runs/tfq_grpo_tiny"
  config.model.preset = "tiny"
  config.model.tokenizer = "small"
  config.image.min_pixels = 56 * 56
  config.image.max_pixels = 56 * 56  # 4x4 patches: 4 image tokens per shape picture

  config.data.task = "shapes"
  config.data.task_options = dict(num_records=2048, min_shapes=2, max_shapes=2, grid_size=2,
                                  relations=("left_of", "right_of"), colours=("red", "blue"),
                                  kinds=("circle", "square"), image_size=56,
                                  statements_per_image=2)
  config.data.eval_task_options = dict(config.data.task_options, num_records=128, seed=1)
  config.data.max_prompt_tokens = 512

  config.rl.preset = "metaphorstar"
  config.rl.group_size = 8
  config.rl.max_new_tokens = 32
  config.rl.overrides = dict(use_kl_loss=False)  # from scratch there is no reference worth keeping
  config.train.prompts_per_step = 16

  config.warmup.think = "I compare the shapes."
  config.stages = [
      common.stage("warm_start", kind="sft", steps=60, learning_rate=3e-3, warmup_steps=5),
      common.stage("grpo", kind="grpo", steps=200, learning_rate=1e-3, warmup_steps=10),
  ]
  config.eval.every = 50
  config.eval.num_examples = 128
  config.checkpoint.every = 50
  if smoke:
    common.make_smoke(config)
  return config
