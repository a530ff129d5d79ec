"""Entropy-branched ("tree") rollouts: CURE's first stage, CINEMA's exploration phase (spec §4.3).

Each prompt first gets `num_roots` rollouts. Every root is then cut before one of its
highest-entropy tokens (the point where the policy was least sure), the prompt plus the root's
text up to that token becomes a new prompt, and `branches` continuations are drawn from it. The
group of a prompt is its roots followed by their branches, num_roots · (1 + branches) rows, and
is optimised as one GRPO group.

The shared prefix is context, not a decision of the branch: as in CURE, where it is part of the
branch's prompt, a branch row's loss covers only its own continuation. Unlike CURE, whose reward
sees only the continuation text, a branch is scored on prefix + continuation, the whole answer a
reader would see: format rewards over tags opened in the prefix would otherwise fail.

Shape letters (README "Shape letters"): O root rows (P · num_roots, for P prompts), B branch rows
(O · branches), N completion tokens, V vocabulary; the top-k candidates of a root are a trailing
unnamed axis (`_`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TreeRollout:
  """CURE's branching knobs (run_cure_stage_1.sh: n1=4, n2=3, critical_top_k=20)."""

  num_roots: int = 4  # n1
  branches: int = 3  # n2: continuations per root
  entropy_top_k: int = 20  # branch at a random one of this many highest-entropy tokens
  min_token_chars: int = 2  # a branch token shows at least this many non-space characters

  def __post_init__(self):
    if self.num_roots < 1 or self.branches < 1:
      raise ValueError(f"tree_rollout needs num_roots >= 1 and branches >= 1, got "
                       f"{self.num_roots} and {self.branches}.")
    if self.entropy_top_k < 1:
      raise ValueError(f"tree_rollout.entropy_top_k must be positive, got {self.entropy_top_k}.")

  @property
  def group_size(self) -> int:
    return self.num_roots * (1 + self.branches)


def branchable_tokens(token_texts: Sequence[str], special_ids, min_chars: int) -> np.ndarray:
  """bool [V]: tokens a branch may start at. CURE skips special tokens and tokens whose text,
  stripped of white space, has fewer than `min_chars` characters (punctuation, lone letters)."""
  table = np.asarray([len(text.strip()) >= min_chars for text in token_texts], bool)
  special = [i for i in special_ids if 0 <= i < len(table)]
  table[special] = False
  return table


def branch_points(key, entropy_ON, tokens_ON, lengths_O, branchable_V, top_k: int):
  """Where each root is cut: a uniform pick among its `top_k` highest-entropy branchable tokens.

  Candidates are positions 1 … length-1 (CURE never branches at the first token, which would
  only resample the whole answer). A root with no candidate is cut at 0, so its branches are
  fresh samples of the prompt, as CURE falls back to.

  Returns:
    (positions_O int32, found_O bool): the prefix length of each root's branches, and whether
    it came from a candidate.
  """
  roots, N = tokens_ON.shape
  columns_N = jnp.arange(N)
  vocab = branchable_V.shape[0]
  allowed_ON = jnp.asarray(branchable_V)[jnp.clip(tokens_ON, 0, vocab - 1)] & (tokens_ON < vocab)
  candidate_ON = allowed_ON & (columns_N[None] >= 1) & (columns_N[None] < lengths_O[:, None])
  k = min(top_k, N)
  ranked_entropy_O_, ranked_position_O_ = jax.lax.top_k(
      jnp.where(candidate_ON, entropy_ON.astype(jnp.float32), -jnp.inf), k)
  usable_O_ = jnp.isfinite(ranked_entropy_O_)
  count_O = usable_O_.sum(axis=1)
  # Top-k puts the usable candidates first, so a uniform index below their count picks one.
  pick_O = jnp.floor(jax.random.uniform(key, (roots,)) * jnp.maximum(count_O, 1)).astype(jnp.int32)
  pick_O = jnp.minimum(pick_O, jnp.maximum(count_O - 1, 0))
  chosen_O = jnp.take_along_axis(ranked_position_O_, pick_O[:, None], axis=1)[:, 0]
  found_O = count_O > 0
  return jnp.where(found_O, chosen_O, 0).astype(jnp.int32), found_O


def join_branches(root_ON, positions_O, continuation_BN, branches: int):
  """Branch rows [B, N]: root r's first positions[r] entries, then the continuation's.

  Branch row b belongs to root b // branches. Works for tokens, log-probs or masks alike; the
  continuation's budget (N - position) means nothing is cut.
  """
  N = root_ON.shape[1]
  root_BN = jnp.repeat(root_ON, branches, axis=0)
  position_B = jnp.repeat(positions_O, branches)
  columns_N = jnp.arange(N)
  from_root_BN = columns_N[None] < position_B[:, None]
  shifted_BN = jnp.take_along_axis(
      continuation_BN, jnp.clip(columns_N[None] - position_B[:, None], 0, N - 1), axis=1)
  return jnp.where(from_root_BN, root_BN, shifted_BN)


def group_order(num_prompts: int, tree: TreeRollout) -> np.ndarray:
  """Row order that lays [roots (O rows) ; branches (B rows)] out as one group per prompt:
  prompt p's roots, then its roots' branches root by root (CURE's concatenation order)."""
  n1, n2 = tree.num_roots, tree.branches
  roots_P_ = np.arange(num_prompts * n1).reshape(num_prompts, n1)
  branches_P_ = num_prompts * n1 + np.arange(num_prompts * n1 * n2).reshape(num_prompts, n1 * n2)
  return np.concatenate([roots_P_, branches_P_], axis=1).reshape(-1)
