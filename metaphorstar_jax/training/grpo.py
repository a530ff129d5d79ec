"""One GRPO step: rollouts for a batch of prompts, group advantages, then μ epochs of mini-batch
updates with gradient accumulation.

    draw     G rollouts per prompt, decoded and scored (dynamic sampling may draw more)
    score    old and reference log-probs when needed, in-reward KL, group advantages
    update   for each epoch and mini-batch: summed micro-batch gradients, one optimizer update

Shape letters (README "Shape letters"): P prompts, G group size, B rows (P·G), N completion tokens.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from metaphorstar_jax import rl
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.training.batching import (mean_metrics, micro_batches, minibatch_metrics,
                                                place_selected, prompt_subsets, rows_of)
from metaphorstar_jax.training.dynamic_sampling import dynamic_sampling
from metaphorstar_jax.training.learner import Learner
from metaphorstar_jax.training.rollout import ScoredGroups, draw_groups, reward_components
from metaphorstar_jax.training.state import RunState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class UpdateRows:
  """What the loss needs of each of the B rows, besides its tokens."""

  loss_mask_BN: np.ndarray
  advantages_B: np.ndarray
  sampler_logprobs_BN: np.ndarray
  old_logprobs_BN: np.ndarray | None  # off-policy updates (several epochs or mini-batches)
  ref_logprobs_BN: np.ndarray | None  # a KL term against the reference policy


def micro_parts(learner: Learner) -> int:
  return learner.config.train.num_minibatches * learner.config.train.grad_accum_steps


def draw(learner: Learner, run: RunState, batch, next_batch, key) -> tuple[ScoredGroups | None,
                                                                          dict]:
  """The step's scored groups; with DAPO's filter_groups, only those whose rewards differ, drawn
  from as many batches (`next_batch()`) as it takes."""
  o = learner.objective
  drawn = lambda b, k: draw_groups(run.params, o, b, learner.task, learner.processor,
                                   learner.sampler, k)
  groups, metrics = drawn(batch, key)
  if not o.loss.filter_groups:
    return groups, metrics

  def more(index):
    extra = next_batch() if next_batch is not None else None
    return None if extra is None else drawn(extra, jax.random.fold_in(key, index))[0]
  groups, filter_metrics = dynamic_sampling(groups, more, o, learner.sampler,
                                            multiple=micro_parts(learner),
                                            wanted=learner.config.train.prompts_per_step)
  return groups, {**metrics, **filter_metrics}


def policy_logprobs(learner: Learner, groups: ScoredGroups, *policies) -> list:
  """[B, N] log-probs of every sampled token under each of `policies` (None gives None), from one
  pass over the micro-batches, so each is collated and placed once for all of them."""
  rows, G = groups.rows, learner.objective.group_size
  outs = [None if p is None else np.zeros_like(rows.sampler_logprobs_BN) for p in policies]
  if all(out is None for out in outs):
    return outs
  for seq, selected in micro_batches(groups.examples, groups.prepared, rows.tokens_BN,
                                     rows.mask_BN, prompt_subsets(groups.num_prompts,
                                                                  micro_parts(learner)),
                                     G, learner.sampler, learner.mesh):
    for params, out in zip(policies, outs):
      if out is not None:
        out[selected] = sharding_lib.to_host(learner.steps.logprobs(params, seq))
  return outs


def score(learner: Learner, run: RunState, groups: ScoredGroups) -> tuple[UpdateRows, dict]:
  """Advantages and log-probs the loss compares against; moves the in-reward KL coefficient."""
  loss_cfg, train_cfg = learner.objective.loss, learner.config.train
  rows = groups.rows
  trained_BN = rows.trained_mask_BN()
  on_policy = train_cfg.ppo_epochs == 1 and train_cfg.num_minibatches == 1
  needs_ref = loss_cfg.use_kl_loss or loss_cfg.use_kl_in_reward
  old, ref = policy_logprobs(learner, groups, None if on_policy else run.params,
                             run.ref_params if needs_ref else None)
  shaped, metrics = groups.shaped_B, {}
  if loss_cfg.use_kl_in_reward:
    # verl's order: the sampling policy's log-probs against the reference's, per token, summed
    # into each row's reward before the advantages; the controller then moves the coefficient.
    behaviour = old if old is not None else rows.sampler_logprobs_BN
    shaped, kl_B = rl.kl_in_reward(loss_cfg, run.kl_coef, shaped, behaviour, ref, trained_BN)
    shaped, current_kl = np.asarray(shaped), float(np.mean(kl_B))
    metrics = {"kl_in_reward/coef": run.kl_coef, "kl_in_reward/kl": current_kl,
               "reward/penalised_mean": float(shaped.mean())}
    run.kl_coef = float(rl.next_kl_coef(loss_cfg, run.kl_coef, current_kl, len(shaped)))
  advantages = rl.compute_advantages(
      loss_cfg, jnp.asarray(shaped).reshape(groups.num_prompts, learner.objective.group_size))
  return UpdateRows(loss_mask_BN=np.asarray(rl.loss_mask(loss_cfg, trained_BN, rows.truncated_B)),
                    advantages_B=np.asarray(advantages).reshape(-1),
                    sampler_logprobs_BN=rows.sampler_logprobs_BN, old_logprobs_BN=old,
                    ref_logprobs_BN=ref), metrics


def update(learner: Learner, run: RunState, groups: ScoredGroups, update_rows: UpdateRows,
           seed: int) -> dict:
  """ppo_epochs passes over shuffled mini-batches, each one optimizer update of its summed
  micro-batch gradients; returns the mean mini-batch metrics and the last update's."""
  train_cfg, steps, G = learner.config.train, learner.steps, learner.objective.group_size
  rows = groups.rows
  collected, applied = [], {}
  shuffle_rng = np.random.default_rng(seed + run.global_step)
  for _ in range(train_cfg.ppo_epochs):
    for minibatch in prompt_subsets(groups.num_prompts, train_cfg.num_minibatches, shuffle_rng):
      # The sum over a mini-batch does not depend on its order; sorted, a single mini-batch
      # reuses the sampler's prepared prompts instead of collating them again.
      minibatch = np.sort(minibatch)
      selected = rows_of(minibatch, G)
      token_count = float(max(1.0, update_rows.loss_mask_BN[selected].sum()))
      seq_count = float(len(selected))
      grads, micro_metrics = None, []
      for seq, micro_rows in micro_batches(groups.examples, groups.prepared, rows.tokens_BN,
                                           rows.mask_BN,
                                           np.split(minibatch, train_cfg.grad_accum_steps), G,
                                           learner.sampler, learner.mesh):
        r = place_selected(update_rows, micro_rows, learner.mesh)
        g, m = steps.grpo_grads(run.params, seq, r.advantages_B, r.old_logprobs_BN,
                                r.ref_logprobs_BN, r.sampler_logprobs_BN, r.loss_mask_BN,
                                token_count, seq_count)
        grads = g if grads is None else steps.accumulate(grads, g)
        micro_metrics.append(m)
      collected.append(minibatch_metrics(micro_metrics))
      run.params, run.opt_state, applied = steps.apply(run.params, run.opt_state, grads)
  return {**mean_metrics(collected), **{k: float(v) for k, v in applied.items()}}


def rollout_metrics(learner: Learner, groups: ScoredGroups, update_rows: UpdateRows) -> dict:
  rows, rewards = groups.rows, groups.rewards_B
  reward_metrics = reward_components(groups.scores)
  metrics = {
      "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
      # What the advantages saw: the task reward after the overlong penalty (and in-reward KL,
      # reported as reward/penalised_mean).
      "reward/shaped_mean": float(groups.shaped_B.mean()),
      "reward/overlong_penalty_mean": float((rewards - groups.shaped_B).mean()),
      **reward_metrics,
      "accuracy": reward_metrics.get("reward/accuracy", float("nan")),
      "response_length/mean": float(rows.lengths_B.mean()),
      "response_length/max": int(rows.lengths_B.max()),
      "response_length/truncated_frac": float(rows.truncated_B.mean()),
      "advantages/abs_mean": float(np.abs(update_rows.advantages_B).mean()),
  }
  tree = learner.objective.tree
  if tree is not None:  # how the branches fared against the roots they came from
    is_root_G = np.arange(learner.objective.group_size) < tree.num_roots
    by_group = rewards.reshape(groups.num_prompts, -1)
    metrics["tree/root_reward_mean"] = float(by_group[:, is_root_G].mean())
    metrics["tree/branch_reward_mean"] = float(by_group[:, ~is_root_G].mean())
  return metrics


def step(learner: Learner, run: RunState, batch, next_batch=None) -> dict:
  """One GRPO step on `batch`; with DAPO's `filter_groups`, `next_batch()` draws more prompts."""
  seed = learner.config.seed
  t0 = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(seed), run.global_step)
  groups, sampling_metrics = draw(learner, run, batch, next_batch, key)
  t_sample = time.perf_counter() - t0
  if groups is None:
    # Not `skipped_updates`: that one counts non-finite updates since the stage began.
    return {**sampling_metrics, "dynamic_sampling/skipped_update": 1.0,
            "sample_seconds": t_sample, "step_seconds": t_sample}
  update_rows, kl_metrics = score(learner, run, groups)
  update_metrics = update(learner, run, groups, update_rows, seed)
  new_tokens = int(groups.rows.trained_mask_BN().sum())
  return {**rollout_metrics(learner, groups, update_rows), **kl_metrics, **sampling_metrics,
          **update_metrics, "rollout_tokens_per_s": new_tokens / max(t_sample, 1e-9),
          "sample_seconds": t_sample, "step_seconds": time.perf_counter() - t0}
