"""The embedded default: a tiny Qwen2.5-VL trained from scratch on the built-in shapes task, on CPU.

Stage 1 teaches only MetaphorStar's <think>/<answer> format: every image gets one target per
answer (T and F), so it cannot teach the task. Stage 2 is GRPO with MetaphorStar's objective.
Held-out accuracy is printed before and after GRPO.

    python -m metaphorstar_jax.train                                  # this config
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_tiny.py --config.stages[1].steps=50
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.workdir = "runs/tfq_grpo_tiny"
  config.model.preset = "tiny"
  config.model.tokenizer = "small"
  config.image.min_pixels = config.image.max_pixels = 112 * 112  # 16 image tokens

  # "There is a red circle in the image." about one or two circles in red, blue or green on a
  # 2x2 grid: the wording is fixed, so only the image decides T or F (half are true).
  config.data.task = "shapes"
  config.data.task_options = dict(num_records=4096, min_shapes=1, max_shapes=2, grid_size=2,
                                  colours=("red", "blue", "green"), kinds=("circle",),
                                  target="red circle", image_size=112, statements_per_image=1,
                                  prompt="short")
  config.data.eval_task_options = dict(config.data.task_options, num_records=128, seed=1)
  config.data.max_prompt_tokens = 512

  config.rl.preset = "metaphorstar"
  config.rl.group_size = 8
  config.rl.max_new_tokens = 32
  # Nothing in GRPO pulls a binary answer's overall bias back once it drifts: every mixed group
  # pushes towards its own correct answer with the same weight, and Adam's first steps move every
  # parameter by about the learning rate. Without a restoring force the answers can collapse
  # onto all-T or all-F before the image features form (measured), after which every group
  # scores alike and learning stops. The KL to the warm start's even split is that force; at
  # coefficient 1 it pulls about as hard as cross-entropy on balanced labels would.
  config.rl.overrides = dict(use_kl_loss=True, kl_loss_coef=1.0)
  config.train.prompts_per_step = 16

  config.sft_targets.think = "I look for a red circle."
  config.stages = [
      common.stage("warm_start", kind="sft", steps=30, learning_rate=3e-3, warmup_steps=5),
      common.stage("grpo", kind="grpo", steps=150, learning_rate=5e-4, warmup_steps=10),
  ]
  config.eval.every = 50
  config.eval.num_examples = 128
  config.checkpoint.every = 50
  if smoke:
    common.make_smoke(config)
  return config
