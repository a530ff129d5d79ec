"""Rewards: pure scorers of one completion for each seed task.

Every scorer takes the decoded completion text plus the plain values of a record (never a
model) and returns a dict of floats with an "overall" entry, the scalar an RL trainer uses, next
to its components ("format", "accuracy", ...). None of them raises on any completion text.

  tfq        MetaphorStar TFQ-GRPO reward, TFQ-Bench / MCQ answer extraction
  reasonmap  RewardMap reward, ReasonMap accuracy and map score
  tvr        STAR-R1 partial-credit reward, TVR state-difference metrics
  cinema     CINEMA meta-action format and answer correctness
"""

from metaphorstar_jax.rewards.cinema import cinema_reward
from metaphorstar_jax.rewards.math_grader import grade_answer
from metaphorstar_jax.rewards.reasonmap import planning_benchmark_scores, reasonmap_reward
from metaphorstar_jax.rewards.tfq import extract_mcq_answer, extract_tfq_answer, tfq_reward
from metaphorstar_jax.rewards.tvr import score_transformations, tvr_reward

__all__ = [
  "cinema_reward",
  "extract_mcq_answer",
  "extract_tfq_answer",
  "grade_answer",
  "planning_benchmark_scores",
  "reasonmap_reward",
  "score_transformations",
  "tfq_reward",
  "tvr_reward",
]
