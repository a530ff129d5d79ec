"""STAR-R1-7B: single-stage GRPO on TVR (TRANCE) transformation reasoning (spec §3).

The model sees an initial and a final image and names every change as object.attribute.value
inside <answer>; the reward is format (0/1) plus partial credit per predicted change, 5.0 / 1.5 /
0.5 for a full / index+attribute / index-only match, minus penalties for over-enumeration and
empty answers (§3.3). STAR-R1's code, data and training numbers are unreleased (§3.1), so every
number below that is not in §3.2-3.3 is marked [GAP] with the choice made here.

    python -m metaphorstar_jax.train --config=configs/star_r1_7b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.train=/data/tvr/train.jsonl --config.data.eval=/data/tvr/test.jsonl
    python -m metaphorstar_jax.evaluate --config=configs/star_r1_7b.py \
        --checkpoint=runs/star_r1_7b --config.data.eval=/data/tvr/test.jsonl
    python -m metaphorstar_jax.evaluate --config=configs/star_r1_7b.py:smoke   # tiny, miniature
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.workdir = "runs/star_r1_7b"

  config.model.hf_path = ""  # --config.model.hf_path=/ckpt/Qwen2.5-VL-7B-Instruct
  config.model.preset = "7b"  # §3.1: Qwen2.5-VL-7B (the CVPR notes)
  config.model.tokenizer = ""
  config.model.dtype = "bfloat16"  # §6.1
  config.model.param_dtype = "float32"  # [GAP] fp32 master weights
  config.model.remat = True  # [GAP] two images and long answers per sequence
  config.model.freeze_vision = False  # [GAP]
  config.image.min_pixels = 3136  # [GAP] the Qwen2.5-VL default
  config.image.max_pixels = 320 * 240  # §3.2: TRANCE renders 320×240; keep them native

  config.data.task = "tvr"
  config.data.task_options = dict(
      format_weight=1.0,  # §3.3: R = R_format + R_acc
      full_match=5.0,  # §3.3: index, attribute and value right
      index_attribute_match=1.5,  # §3.3: index and attribute right
      index_match=0.5,  # §3.3: only the index right
      over_enumeration_penalty=1.0,  # [GAP] §3.3 names the penalty, not its size
      empty_answer_penalty=1.0,  # [GAP] likewise for passive inaction
  )
  config.data.train = ""  # [GAP] TRANCE-derived JSONL (layout in tasks/tvr.py)
  config.data.eval = ""  # §3.2: ID = center view, OOD = left/right views
  config.data.max_prompt_tokens = 2048  # [GAP] two 320×240 images + the object list fit easily

  config.rl.preset = "grpo"  # §3.3: GRPO, single-stage pure RL; its knobs are [GAP] (verl's)
  config.rl.overrides = {}
  config.rl.group_size = None  # [GAP] unset: the preset's n=5
  config.rl.temperature = 1.0  # [GAP] the usual rollout temperature
  config.rl.top_p = 1.0  # [GAP]
  config.rl.max_new_tokens = 1024  # [GAP] a reasoning span plus a short list of changes

  config.train.prompts_per_step = 64  # [GAP]
  config.train.num_minibatches = 2  # [GAP]
  config.train.grad_accum_steps = 4  # memory only: 8 prompts × 5 = 40 sequences per micro-batch
  config.optim.schedule = "constant"  # [GAP]
  config.optim.weight_decay = 1e-2  # [GAP] as the EasyR1-family recipes of §1.4 and §2.3
  config.optim.grad_clip_norm = 1.0  # [GAP] likewise
  # §3.3: no SFT stage. Steps and lr are [GAP]: 500 steps at 1e-6, the recipes' usual lr.
  config.stages = [common.stage("grpo", kind="grpo", steps=500, learning_rate=1e-6,
                                warmup_steps=0)]

  config.eval.every = 50  # [GAP]
  config.eval.num_examples = 512  # [GAP]
  config.eval.batch_size = 32
  config.eval.greedy = True  # [GAP]
  # [GAP] the paper gives no sampled-evaluation settings; --sampling=validation draws at the
  # rollout's temperature and top-p, one sample per record unless --num_samples says more.
  config.eval.temperature = config.rl.temperature
  config.eval.top_p = config.rl.top_p
  config.eval.num_samples = 1
  config.eval.max_new_tokens = 1024  # [GAP] as rl.max_new_tokens
  config.checkpoint.every = 50  # [GAP]

  if smoke:
    common.make_smoke(config)
  return config
