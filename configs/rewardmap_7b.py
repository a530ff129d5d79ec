"""RewardMap-7B: GRPO on transit maps with RewardMap's curriculum (spec §2.3-2.5).

One GRPO stage, one pass over ReasonMap-Train in curriculum order (true/false, then counting,
then route planning; §2.4), from Qwen2.5-VL-7B-Instruct, with the difficulty-weighted detail
reward of §2.5. The release does not validate during training; evaluate on the ReasonMap
benchmark (validation split, short and long questions; §2.6) afterwards.

    python -m metaphorstar_jax.train --config=configs/rewardmap_7b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.train=/data/ReasonMap-Train --config.data.eval=/data/ReasonMap
    python -m metaphorstar_jax.evaluate --config=configs/rewardmap_7b.py \
        --checkpoint=runs/rewardmap_7b --config.data.eval=/data/ReasonMap
    python -m metaphorstar_jax.train --config=configs/rewardmap_7b.py:smoke   # tiny, CPU
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.workdir = "runs/rewardmap_7b"

  config.model.hf_path = ""  # --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct
  config.model.preset = "7b"  # §2.3: Qwen/Qwen2.5-VL-7B-Instruct
  config.model.tokenizer = ""
  config.model.dtype = "bfloat16"  # §6.1
  config.model.param_dtype = "float32"  # [infer] fp32 master weights, as FSDP keeps them
  config.model.remat = True  # [infer] 20k-token prompts; the release turns checkpointing on too
  config.model.freeze_vision = False  # [GAP] the release does not freeze it either
  config.image.min_pixels = 3136  # §2.3
  config.image.max_pixels = 128450560  # §2.3: very high-resolution maps

  config.data.task = "reasonmap"
  config.data.task_options = dict(
      curriculum="rewardmap",  # §2.4: TorF → Counting2/3 → Counting1 → planning, no shuffle
      difficulty_aware=True,  # §2.5: ×1.0/1.2/1.5 by city, +0.5 for transfer planning
      fix_leg_count_off_by_one=False,  # §2.5: keep the release's leg-count quirk for parity
      format_bonus=0.0,  # §2.5: no format term in the released reward
  )
  config.data.train = ""  # §2.1: FSCCS/ReasonMap-Train (≈3.27k questions)
  config.data.eval = ""  # §2.6: FSCCS/ReasonMap, validation split
  config.data.max_prompt_tokens = 20000  # §2.3: max_prompt_length

  config.rl.preset = "grpo"  # §2.3: adv_estimator grpo (group z-score), KL as a loss
  config.rl.overrides = dict(
      use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=1e-2,  # §2.3 (the .sh's 1e-2)
      use_kl_in_reward=False,  # §2.3: in-reward KL coefficient 0
      entropy_coeff=1e-3,  # §2.3: the framework's default entropy bonus
      clip_ratio_low=0.2, clip_ratio_high=0.2,  # §2.3: symmetric PPO clip
      clip_ratio_c=None,  # §2.3 lists plain PPO clipping, no dual-clip [infer]
      loss_agg_mode="token-mean",  # §2.3: token masked mean
  )
  config.rl.group_size = 4  # §2.3: rollout.n=4 (the launch script; the yaml says 8)
  config.rl.temperature = 1.0  # §2.3
  config.rl.top_p = 1.0  # §2.3
  config.rl.top_k = 0  # §2.3: top_k -1, no truncation (0 here)
  config.rl.max_new_tokens = 2048  # §2.3: max_response_length

  config.train.prompts_per_step = 16  # §2.3: rollout_batch_size
  config.train.num_minibatches = 1  # §2.3: actor global_batch_size 16 = one update per step
  config.train.ppo_epochs = 1  # [infer] the framework's default
  # Memory only: 8 micro-batches of 2 prompts = 8 sequences, 1 per device on 8 devices (§2.3:
  # micro-batch 1 per device, 8 GPUs).
  config.train.grad_accum_steps = 8

  config.optim.schedule = "constant"  # [infer] the framework's default
  config.optim.weight_decay = 1e-2  # §2.3
  config.optim.grad_clip_norm = 1.0  # §2.3 (max_grad_norm, the release's yaml)
  # §2.3: total_episodes 1 over ≈3,270 questions (§2.1) at 16 a step = 204 steps; lr 1e-6.
  config.stages = [common.stage("grpo", kind="grpo", steps=204, learning_rate=1e-6,
                                warmup_steps=0)]

  config.eval.every = 0  # §2.3: no validation during training
  config.eval.num_examples = 2048  # all: ≈1.01k benchmark rows × (short, long) questions (§2.1)
  config.eval.batch_size = 8
  config.eval.greedy = True  # [GAP] the ReasonMap protocol's decoding is not stated
  # [GAP] the paper gives no sampled-evaluation settings; --sampling=validation draws at the
  # rollout's temperature and top-p, one sample per record unless --num_samples says more.
  config.eval.temperature = config.rl.temperature
  config.eval.top_p = config.rl.top_p
  config.eval.num_samples = 1
  config.eval.max_new_tokens = 2048  # §2.6
  config.checkpoint.every = 100  # §2.3: save_freq

  if smoke:
    common.make_smoke(config)
  return config
