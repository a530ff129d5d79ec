"""MetaphorStar-3B: TFQ-GRPO from Qwen2.5-VL-3B-Instruct on TFQ-Data-Lite (spec §1.3-1.4).

End-to-end RL with no SFT warm-up (§1.3): one GRPO stage of 5 epochs over TFQ-Data-Lite's 984
questions, 64 prompts a step, 5 samples each, validated on TFQ-Bench-Lite every 5 steps.
Published on TFQ-Bench-Lite (§1.9): TFQ 62% (all-or-nothing per image), MCQ 64%, OSQ 3.06;
the base model scores 20% / 48% / 2.44.

    python -m metaphorstar_jax.train --config=configs/tfq_grpo_3b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-3B-Instruct \
        --config.data.train=/data/TFQ-Data-Lite --config.data.eval=/data/TFQ-Bench-Lite
    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_3b.py \
        --checkpoint=runs/tfq_grpo_3b --config.data.eval=/data/TFQ-Bench-Lite
    # OSQ (judge from METAPHORSTAR_JUDGE_URL / _API_KEY), candidates at §1.8's temperature 0.7:
    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_3b.py --checkpoint=... \
        --config.data.task=tfq_osq --config.data.eval=/data/osq --config.eval.temperature=0.7
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_3b.py:smoke   # tiny, CPU
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  # Micro-batching: 16 micro-batches of 2 prompts, 10 sequences, 5 per device on 2 devices
  # (§1.4: 3B ran on 2 GPUs, 4 per device per update).
  return common.tfq_grpo("3b", grad_accum_steps=16, smoke=smoke)
