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
  config.image.min_pixels = config.image.max_pixels = 112 * 112  # 16 image tokens

  # "The red circle is to the left of the blue circle." about two circles on a 2x2 grid: the
  # wording is fixed (canonical_pairs), so only the image's layout decides T or F.
  config.data.task = "shapes"
  config.data.task_options = dict(num_records=4096, min_shapes=2, max_shapes=2, grid_size=2,
                                  relations=("left_of",), colours=("red", "blue"),
                                  kinds=("circle",), image_size=112, statements_per_image=1,
                                  canonical_pairs=True, prompt="short")
  config.data.eval_task_options = dict(config.data.task_options, num_records=128, seed=1)
  config.data.max_prompt_tokens = 512

  config.rl.preset = "metaphorstar"
  config.rl.group_size = 8
  config.rl.max_new_tokens = 32
  config.rl.overrides = dict(use_kl_loss=False)  # from scratch there is no reference worth keeping
  config.train.prompts_per_step = 16

  config.warmup.think = "I compare the two circles."
  config.stages = [
      common.stage("warm_start", kind="sft", steps=30, learning_rate=3e-3, warmup_steps=5),
      common.stage("grpo", kind="grpo", steps=200, learning_rate=1e-3, warmup_steps=10),
  ]
  config.eval.every = 50
  config.eval.num_examples = 128
  config.checkpoint.every = 50
  if smoke:
    common.make_smoke(config)
  return config
