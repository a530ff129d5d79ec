"""MetaphorStar-32B: TFQ-GRPO from Qwen2.5-VL-32B-Instruct on TFQ-Data-Lite (spec §1.3-1.4).

End-to-end RL with no SFT warm-up (§1.3): one GRPO stage of 5 epochs over TFQ-Data-Lite's 984
questions, 64 prompts a step, 5 samples each, validated on TFQ-Bench-Lite every 5 steps.
Published on TFQ-Bench-Lite (§1.9): TFQ 74% (all-or-nothing per image), MCQ 78%, OSQ 3.94;
the base model scores 56% / 62% / 3.08.

    python -m metaphorstar_jax.train --config=configs/tfq_grpo_32b.py \
        --config.model.hf_path=/ckpt/Qwen2.5-VL-32B-Instruct \
        --config.data.train=/data/TFQ-Data-Lite --config.data.eval=/data/TFQ-Bench-Lite
    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_32b.py \
        --checkpoint=runs/tfq_grpo_32b --config.data.eval=/data/TFQ-Bench-Lite
    # OSQ (judge from METAPHORSTAR_JUDGE_URL / _API_KEY), candidates at §1.8's temperature 0.7:
    python -m metaphorstar_jax.evaluate --config=configs/tfq_grpo_32b.py --checkpoint=... \
        --config.data.task=tfq_osq --config.data.eval=/data/osq --config.eval.temperature=0.7
    python -m metaphorstar_jax.train --config=configs/tfq_grpo_32b.py:smoke   # tiny, CPU
"""

import ml_collections

from metaphorstar_jax import config_defaults as common


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
  # Micro-batching: 2 micro-batches of 16 prompts, 80 sequences, 5 per chip on a v5p-32 (16
  # chips; 5 per GPU on two 8-GPU nodes), the rollout prefilled 16 prompts at a time, one per
  # chip (README "Will it fit?"). §1.4 ran 32B on one 8-GPU node; its vLLM TP=2 is a
  # rollout-engine setting with no counterpart here, where sampler and trainer share the mesh.
  return common.tfq_grpo("32b", grad_accum_steps=2, prefill_chunk=16, smoke=smoke)
