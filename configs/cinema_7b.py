"""CINEMA-7B: meta-action reasoning over many images in three stages (spec §4).

1. cold_start (sft): supervised meta-action trajectories (Global / Focus / Hint / Think /
   Answer) from retrieval-based tree sampling, 57k instances (§4.2).
2. exploration (grpo): the diversity-preserving phase. CINEMA's code is unreleased (§4.1); the
   closest released recipe is CURE's first stage (§4.3): 4 rollouts per prompt, then 3
   continuations branched at one of the 20 highest-entropy tokens of each, 16 responses per
   group, optimised with DAPO's objective.
3. dapo (grpo): annealed exploitation with DAPO (§4.2), CURE's second stage (§4.3).
Unknown numbers are marked [GAP] or [infer] with the choice made here.

The stages use the per-stage fields of config_defaults.STAGE_FIELDS (each replaces a run-wide
value for its stage only; left out, the run-wide value holds):
  rl_preset, rl_overrides (merged over rl.overrides), group_size, prompts_per_step,
  gen_prompts_per_step (prompts drawn per generation batch while dynamic sampling keeps only
  groups with mixed rewards), tree_rollout (num_roots rollouts, each branched at a random one of
  its entropy_top_k highest-entropy tokens into `branches` continuations; group =
  num_roots · (1 + branches); see rl/tree.py), and sft_data (the cold-start trajectories: JSONL
  with the record fields plus a "target" text; unset, as here: required).

    python -m metaphorstar_jax.train --config=configs/cinema_7b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.stages[0].sft_data=/data/cinema/cold_start.jsonl \
        --config.data.train=/data/cinema/rl.jsonl --config.data.eval=/data/cinema/eval.jsonl
    python -m metaphorstar_jax.evaluate --config=configs/cinema_7b.py:smoke   # tiny, miniature
"""

import ml_collections

from metaphorstar_jax import config_defaults as common

# §4.3 (CURE's DAPO settings, both RL stages): clip 0.2/0.28, dual-clip 10, token-mean, no KL
# anywhere, no entropy bonus, dynamic sampling on accuracy with at most 10 generation batches,
# a 512-token overlong buffer with penalty factor 1.0.
DAPO_OVERRIDES = dict(
    clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0,  # §4.3
    loss_agg_mode="token-mean",  # §4.3
    use_kl_loss=False, use_kl_in_reward=False, entropy_coeff=0.0,  # §4.3
    filter_groups=True, filter_groups_metric="acc", max_num_gen_batches=10,  # §4.3
    overlong_buffer=True, overlong_buffer_len=512, overlong_penalty_factor=1.0,  # §4.3
)


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.workdir = "runs/cinema_7b"

  config.model.hf_path = ""  # --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct
  config.model.preset = "7b"  # §4.2: presumably Qwen2.5-VL-7B [infer]
  config.model.tokenizer = ""
  config.model.dtype = "bfloat16"  # §6.1
  config.model.param_dtype = "float32"  # [GAP] fp32 master weights
  config.model.remat = True  # [GAP] many images per sequence
  config.model.freeze_vision = False  # [GAP]
  config.image.min_pixels = 3136  # [GAP] the Qwen2.5-VL default
  config.image.max_pixels = 401408  # [GAP] 512 visual tokens per image, for many-image prompts

  config.data.task = "cinema"
  config.data.task_options = dict(format_weight=0.5, accuracy_weight=1.0)  # [GAP] §4.2 weights
  config.data.train = ""  # §4.2: 58k RL instances (multi-image, video frames, single image)
  config.data.eval = ""  # §4.2: MUIR, MVMath, video and single-image benchmarks
  # [GAP] CURE's 1500- then 512-token prompt budgets (§4.3) are for text; many images need more.
  config.data.max_prompt_tokens = 8192

  config.rl.preset = "dapo"  # §4.2-4.3: both RL stages optimise DAPO's objective
  config.rl.overrides = dict(DAPO_OVERRIDES)
  config.rl.group_size = 16  # §4.3: n=16
  config.rl.temperature = 1.0  # §4.3
  config.rl.top_p = 1.0  # §4.3
  config.rl.max_new_tokens = 4096  # [GAP] must exceed the 512-token overlong buffer (§4.3)

  config.train.prompts_per_step = 512  # §4.3: train_prompt_bsz
  config.train.num_minibatches = 16  # §4.3: mini-batch 32 of the 512 prompts
  config.train.ppo_epochs = 1  # §4.3 [infer] the recipe's default
  config.train.grad_accum_steps = 4  # memory only: 8 prompts × 16 = 128 sequences per micro-batch

  config.optim.schedule = "constant"  # §4.3 [infer] warmup then constant, verl's default
  config.optim.weight_decay = 0.1  # §4.3
  config.optim.grad_clip_norm = 1.0  # §4.3

  config.stages = [
      # §4.2: 57k cold-start instances. Batch, epochs and lr are [GAP]: one epoch of 128
      # examples a step (445 steps) at RewardMap's SFT lr 1e-5 with 10% warmup (§2.2).
      common.stage("cold_start", kind="sft", steps=445, learning_rate=1e-5, warmup_steps=45,
                   prompts_per_step=128,
                   sft_data=common.unset(str)),  # required: no data,
                   # no cold start (the format-only warm start would teach T|F answers here)
      # §4.3: CURE's first stage ran 300 steps; lr 1e-6 with 10 warmup steps.
      common.stage("exploration", kind="grpo", steps=300, learning_rate=1e-6, warmup_steps=10,
                   rl_preset="dapo", rl_overrides=dict(DAPO_OVERRIDES), group_size=16,
                   prompts_per_step=512, gen_prompts_per_step=1024,
                   tree_rollout=dict(num_roots=4,  # §4.3: n1
                                     branches=3,  # §4.3: n2, so 4 + 4·3 = 16 per group
                                     entropy_top_k=20,  # §4.3
                                     min_token_chars=2)),  # §4.3: skip tokens of ≤ 1 character
      # §4.3: lr 1e-6, 10 warmup steps. Steps are [infer]: one pass over the 58k RL instances
      # (§4.2) at 512 prompts a step = 113.
      common.stage("dapo", kind="grpo", steps=113, learning_rate=1e-6, warmup_steps=10,
                   rl_preset="dapo", rl_overrides=dict(DAPO_OVERRIDES), group_size=16,
                   prompts_per_step=512, gen_prompts_per_step=1024),  # §4.3: gen_prompt_bsz
  ]

  config.eval.every = 50  # [GAP]
  config.eval.num_examples = 512  # [GAP]
  config.eval.batch_size = 16
  config.eval.greedy = True  # [GAP]
  # [GAP] the paper gives no sampled-evaluation settings; --sampling=validation draws at the
  # rollout's temperature and top-p, one sample per record unless --num_samples says more.
  config.eval.temperature = config.rl.temperature
  config.eval.top_p = config.rl.top_p
  config.eval.num_samples = 1
  config.eval.max_new_tokens = 4096  # [GAP] as rl.max_new_tokens
  config.checkpoint.every = 50  # [GAP]

  if smoke:
    common.make_smoke(config)
    config.data.max_prompt_tokens = 1024  # several images per record
  return config
