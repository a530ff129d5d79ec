"""GRPO-family RL objectives as pure jnp functions: advantages, policy losses, KL, DAPO pieces.

Everything here is jit-able with static shapes and a static config, and has no Python control
flow on array values. A trainer's step, in order (README "Shape letters": P prompts, G group size,
B = P·G rows, row b answering prompt b // G, N completion tokens):

  cfg = rl.preset("metaphorstar")  # cfg.loss: LossConfig, cfg.rollout: RolloutConfig
  # (DAPO) after each generation batch: rl.filter_groups_mask, rl.dynamic_sampling_decision.
  rewards_B = rl.shape_rewards(cfg.loss, cfg.rollout, rewards_B, lengths_B)
  rewards_B, _ = rl.kl_in_reward(cfg.loss, kl_coef, rewards_B, old_logprobs_BN, ref_logprobs_BN,
                                 mask_BN)
  advantages_B = rl.compute_advantages(cfg.loss, rewards_B.reshape(P, G))
  mask_BN = rl.loss_mask(cfg.loss, mask_BN, truncated_B)
  # inside the jitted, differentiated step:
  loss, metrics = rl.policy_loss(cfg.loss, logprobs_BN, old_logprobs_BN, advantages_B, mask_BN,
                                 ref_logprobs_BN=ref_logprobs_BN)

Module map: `config` (knobs, presets), `advantages`, `aggregation` (loss_agg_mode), `losses`
(PPO-clip, dual-clip, GSPO, TIS, the total loss), `kl`, `logprobs` (log-probs and entropy from
logits, for sampler and trainer alike), `dapo` (dynamic sampling, overlong penalty and
filtering), `tree` (entropy-branched rollouts: where to branch, how branch rows join their roots).
"""

from metaphorstar_jax.rl.advantages import (compute_advantages, flatten_groups, grpo_advantages,
                                            group_statistics, rloo_advantages)
from metaphorstar_jax.rl.aggregation import aggregate, masked_mean
from metaphorstar_jax.rl.config import (ADV_ESTIMATORS, KL_TYPES, LOSS_AGG_MODES, LOSS_MODES,
                                        PRESET_NAMES, LossConfig, RLPreset, RolloutConfig, preset)
from metaphorstar_jax.rl.dapo import (DrawDecision, dynamic_sampling_decision, filter_groups_mask,
                                      loss_mask, mask_truncated, overlong_penalty, shape_rewards)
from metaphorstar_jax.rl.kl import (adaptive_kl_coef, kl_estimate, kl_in_reward, kl_loss,
                                    kl_penalized_rewards, next_kl_coef)
from metaphorstar_jax.rl.logprobs import token_logprobs, token_logprobs_and_entropy
from metaphorstar_jax.rl.losses import (ClippedLoss, clipped_policy_loss, policy_log_ratio,
                                        policy_loss, sequence_log_ratio, tis_weights)
from metaphorstar_jax.rl.tree import (TreeRollout, branch_points, branchable_tokens, group_order,
                                      join_branches)

__all__ = [
    "ADV_ESTIMATORS", "KL_TYPES", "LOSS_AGG_MODES", "LOSS_MODES", "PRESET_NAMES",
    "ClippedLoss", "DrawDecision", "LossConfig", "RLPreset", "RolloutConfig", "TreeRollout",
    "adaptive_kl_coef", "aggregate", "branch_points", "branchable_tokens", "clipped_policy_loss",
    "compute_advantages", "dynamic_sampling_decision",
    "filter_groups_mask", "flatten_groups", "group_order", "group_statistics", "grpo_advantages",
    "join_branches", "kl_estimate", "kl_in_reward", "kl_loss",
    "kl_penalized_rewards", "loss_mask", "mask_truncated", "masked_mean", "next_kl_coef",
    "overlong_penalty", "policy_log_ratio", "policy_loss", "preset", "rloo_advantages",
    "sequence_log_ratio", "shape_rewards", "tis_weights", "token_logprobs",
    "token_logprobs_and_entropy",
]
