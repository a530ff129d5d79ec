"""Drawing a step's rollouts: G completions per prompt from the sampler (independent, or an
entropy-branched tree), decoded to text, scored by the task and shaped by the recipe.

Rows p·G … p·G+G-1 belong to prompt p. Shape letters (README "Shape letters"): P prompts,
G group size, B rows (P·G), N completion tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaphorstar_jax import rl
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.pipeline import collate
from metaphorstar_jax.sampling import Sampler
from metaphorstar_jax.training.objective import Objective


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutRows:
  """B sampled completions on the host, padded to N tokens."""

  tokens_BN: np.ndarray
  mask_BN: np.ndarray  # 1 on generated tokens
  sampler_logprobs_BN: np.ndarray  # under the sampling temperature, as the sampler drew them
  lengths_B: np.ndarray
  truncated_B: np.ndarray  # the row hit max_new_tokens before a stop token
  # Tree rollouts: 1 on the tokens a branch copied from its root (context, not trained on).
  prefix_BN: np.ndarray | None = None

  def take(self, rows: np.ndarray) -> RolloutRows:
    return jax.tree.map(lambda a: a[rows], self)

  def trained_mask_BN(self) -> np.ndarray:
    """1 on the tokens the update learns: generated, and not a branch's copied prefix."""
    return self.mask_BN if self.prefix_BN is None else self.mask_BN * (1 - self.prefix_BN)


def sampled_rows(rollouts) -> RolloutRows:
  """A sampler's `Rollouts`, on the host."""
  host = sharding_lib.to_host
  return RolloutRows(host(rollouts.tokens_BN), host(rollouts.mask_BN), host(rollouts.logprobs_BN),
                     host(rollouts.lengths_B), host(rollouts.truncated_B))


@dataclasses.dataclass
class ScoredGroups:
  """P prompts with G scored rollouts each."""

  records: list
  examples: list
  prepared: tuple  # the sampler's bucketed prompt arrays, in this order
  rows: RolloutRows
  rewards_B: np.ndarray  # the task's overall reward
  shaped_B: np.ndarray  # after the recipe's overlong penalty
  scores: list[dict]  # [B] the task's reward components

  @property
  def num_prompts(self) -> int:
    return len(self.records)


def score_rollouts(task, records, texts: list[str], group_size: int):
  """Per-row total reward (B,) and each row's reward components."""
  scores = [task.score(text, records[row // group_size]) for row, text in enumerate(texts)]
  return np.asarray([s["overall"] for s in scores], np.float32), scores


def reward_components(scores: list[dict]) -> dict:
  """The mean of every reward component over rows, as `reward/<name>` metrics."""
  names = sorted({k for s in scores for k in s} - {"overall"})
  return {f"reward/{name}": float(np.mean([s.get(name, 0.0) for s in scores])) for name in names}


# (id of the tokenizer, V, min_chars) -> (that tokenizer, its table). Holding the tokenizer keeps
# its id from being reused by another one while its table is cached.
_BRANCHABLE: dict[tuple, tuple[Any, np.ndarray]] = {}


def branchable_table(processor, vocab_size: int, min_chars: int) -> np.ndarray:
  """bool [V] of tokens a tree rollout may branch at (rl.branchable_tokens), built once."""
  tokenizer = processor.tokenizer
  cache_key = (id(tokenizer), vocab_size, min_chars)
  if cache_key not in _BRANCHABLE:
    known = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    texts = tokenizer.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
    texts += [""] * (vocab_size - known)  # embedding rows no token maps to
    special = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    _BRANCHABLE[cache_key] = tokenizer, rl.branchable_tokens(texts, special, min_chars)
  return _BRANCHABLE[cache_key][1]


def tree_rows(params, tree: rl.TreeRollout, examples, prepared, processor, sampler: Sampler,
              key) -> tuple[RolloutRows, dict]:
  """Rows of entropy-branched groups (rl/tree.py): num_roots rollouts per prompt, each cut
  before one of its highest-entropy tokens and continued `branches` times from there. The
  entropies are the policy's own, as CURE asks its actor; the sampler reports them as it draws
  (`return_entropy`), which saves a pass over the roots."""
  if not sampler.config.return_entropy:
    raise ValueError("Tree rollouts branch at high-entropy tokens: build the sampler with "
                     "SamplingConfig(return_entropy=True).")
  n1, n2 = tree.num_roots, tree.branches
  P, N = len(examples), sampler.config.max_new_tokens
  root_key, point_key, branch_key = jax.random.split(key, 3)
  drawn = sampler.sample_prepared(prepared, group_size=n1, state=params, key=root_key)
  roots, entropy = sampled_rows(drawn), sharding_lib.to_host(drawn.entropy_BN)
  table = branchable_table(processor, sampler.model_config.text.vocab_size, tree.min_token_chars)
  positions, found = rl.branch_points(point_key, entropy, roots.tokens_BN, roots.lengths_B,
                                      table, tree.entropy_top_k)
  positions = np.asarray(positions)
  # The prompt followed by the root's text up to the branch token is the branch's prompt; its
  # M-RoPE positions continue exactly where the root's decoding had them.
  branch_prompts = [dataclasses.replace(
      examples[r // n1], input_ids_T=np.concatenate(
          [examples[r // n1].input_ids_T, roots.tokens_BN[r, :positions[r]]]).astype(np.int32))
      for r in range(P * n1)]
  continued = sampled_rows(sampler.sample_prepared(
      sampler.prepare(collate(branch_prompts, sampler.pad_id)), group_size=n2,
      state=params, key=branch_key, max_new_tokens_per_row=np.repeat(N - positions, n2)))
  join = lambda root, branch: np.asarray(rl.join_branches(root, positions, branch, n2))
  prefix_B = np.repeat(positions, n2)
  lengths_B = prefix_B + continued.lengths_B
  columns_N = np.arange(N)[None]
  branches = RolloutRows(
      tokens_BN=join(roots.tokens_BN, continued.tokens_BN),
      mask_BN=(columns_N < lengths_B[:, None]).astype(np.int32),
      sampler_logprobs_BN=join(roots.sampler_logprobs_BN, continued.sampler_logprobs_BN),
      lengths_B=lengths_B, truncated_B=continued.truncated_B,
      prefix_BN=(columns_N < prefix_B[:, None]).astype(np.int32))
  roots.prefix_BN = np.zeros_like(roots.mask_BN)
  order = rl.group_order(P, tree)
  rows = jax.tree.map(lambda r, b: np.concatenate([r, b])[order], roots, branches)
  return rows, {"tree/branched_frac": float(np.mean(found)),
                "tree/prefix_mean": float(positions.mean())}


def draw_groups(params, objective: Objective, batch, task, processor, sampler: Sampler,
                key) -> tuple[ScoredGroups, dict]:
  """G rollouts for each prompt of `batch` (independent, or a tree when `objective.tree`),
  decoded, scored and shaped: (ScoredGroups, metrics)."""
  G = objective.group_size
  prepared = sampler.prepare(batch.arrays)
  if objective.tree is None:
    rows, metrics = sampled_rows(sampler.sample_prepared(prepared, group_size=G, state=params,
                                                         key=key)), {}
  else:
    rows, metrics = tree_rows(params, objective.tree, list(batch.examples), prepared, processor,
                              sampler, key)
  texts = sampler.texts(processor, rows.tokens_BN, rows.lengths_B)
  rewards, scores = score_rollouts(task, batch.records, texts, G)
  shaped = np.asarray(rl.shape_rewards(objective.loss, objective.rollout.replace(
      max_response_length=objective.max_new_tokens), jnp.asarray(rewards),
      jnp.asarray(rows.lengths_B)))
  return ScoredGroups(list(batch.records), list(batch.examples), prepared, rows, rewards, shaped,
                      scores), metrics
