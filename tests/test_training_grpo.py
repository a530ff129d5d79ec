"""One GRPO step's pieces (training/grpo.py): what the loss compares against, log-probs over
micro-batches, the updates of the epochs and mini-batches, and the rollout metrics."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaphorstar_jax import rl
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import grpo, step as step_lib
from metaphorstar_jax.training.objective import Objective
from metaphorstar_jax.training.state import RunState
from helpers import make_steps, scored_groups, shapes_prompt_batches

G = 2
REWARDS_PG = [[0, 1], [1, 1], [1, 0], [0, 0.5]]


@pytest.fixture(scope="module")
def setting():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=0)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=3), keep_weights=False)
  return model, sampler, shapes_prompt_batches(1, num_records=8, seed=5)[0]


def learner_and_run(model, sampler, *, loss=None, tree=None, ppo_epochs=1, num_minibatches=1,
                    grad_accum_steps=1, tx=None):
  """What grpo's functions read of a Learner and a RunState, with a fresh TrainSteps (under
  `tx`, default helpers.optim_config's AdamW)."""
  loss = loss or rl.LossConfig()
  objective = Objective(loss=loss, rollout=rl.RolloutConfig(), group_size=G, temperature=1.0,
                        top_p=1.0, top_k=0, max_new_tokens=3, tree=tree)
  steps, params, _ = make_steps(model, loss)
  if tx is not None:
    steps = step_lib.TrainSteps(steps.graphdef, tx, loss, temperature=1.0)
  # The updates donate the parameters: a copy leaves the shared model's arrays alive.
  params = jax.tree.map(jnp.copy, params)
  opt_state = step_lib.init_optimizer_state(steps.tx, params)
  train = types.SimpleNamespace(ppo_epochs=ppo_epochs, num_minibatches=num_minibatches,
                                grad_accum_steps=grad_accum_steps)
  learner = types.SimpleNamespace(config=types.SimpleNamespace(train=train), objective=objective,
                                  steps=steps, sampler=sampler, mesh=None)
  run = RunState(params, opt_state, ref_params=None, global_step=0, stage_index=0,
                 stage_step=0, kl_coef=float(loss.kl_coef))
  return learner, run


def test_score_takes_advantages_of_the_shaped_rewards_over_the_trained_tokens(setting):
  model, sampler, batch = setting
  learner, run = learner_and_run(model, sampler,
                                 loss=rl.LossConfig(mask_truncated_completions=True))
  groups = scored_groups(batch, sampler, REWARDS_PG)
  groups.shaped_B = groups.rewards_B - np.asarray([0, 0, 0, 0.5, 0, 0, 0, 0], np.float32)
  groups.rows.truncated_B[1] = True
  groups.rows.prefix_BN = np.zeros_like(groups.rows.mask_BN)
  groups.rows.prefix_BN[2, :2] = 1  # a branch's copied prefix
  update_rows, metrics = grpo.score(learner, run, groups)
  # On-policy without a KL term: no log-probs to recompute, no in-reward KL.
  assert update_rows.old_logprobs_BN is None and update_rows.ref_logprobs_BN is None
  assert metrics == {}
  want = rl.compute_advantages(learner.objective.loss, groups.shaped_B.reshape(-1, G))
  np.testing.assert_allclose(update_rows.advantages_B, np.asarray(want).reshape(-1), rtol=1e-6)
  assert update_rows.advantages_B[2] > 0  # the shaped rewards differ, the raw ones do not
  want_mask = np.ones((8, 3), np.int32)
  want_mask[1] = 0  # truncated
  want_mask[2, :2] = 0  # copied from its root
  np.testing.assert_array_equal(update_rows.loss_mask_BN, want_mask)
  np.testing.assert_array_equal(update_rows.sampler_logprobs_BN, groups.rows.sampler_logprobs_BN)


def test_log_probs_over_micro_batches_land_on_their_own_rows(setting):
  model, sampler, batch = setting
  groups = scored_groups(batch, sampler, REWARDS_PG)
  groups.rows.mask_BN[:, 2] = 0  # a shorter completion in every row
  learner, run = learner_and_run(model, sampler, num_minibatches=2)
  whole, _ = learner_and_run(model, sampler)
  none, split = grpo.policy_logprobs(learner, groups, None, run.params)
  assert none is None
  [want] = grpo.policy_logprobs(whole, groups, run.params)
  assert split.shape == (8, 3) and not split[:, 2].any()
  np.testing.assert_allclose(split, want, atol=1e-5)
  assert np.all(split[:, :2] < 0)
  # Rows differ in tokens, so a row scored against another's place would show.
  assert len({round(float(v), 5) for v in split[:, 0]}) > 1


def adam_count(opt_state):
  return int(opt_state.inner_state[1][0].count)


def test_each_epoch_and_mini_batch_is_one_update_of_summed_micro_batch_gradients(setting):
  model, sampler, batch = setting
  groups = scored_groups(batch, sampler, REWARDS_PG)
  steps_taken, losses = {}, {}
  for accum in (1, 2):
    # Plain SGD: the step is the gradient itself, which AdamW's normalisation would hide.
    learner, run = learner_and_run(model, sampler, grad_accum_steps=accum,
                                   tx=optax.apply_if_finite(optax.sgd(1.0), 3))
    before = jax.tree.map(np.asarray, run.params)
    update_rows, _ = grpo.score(learner, run, groups)
    losses[accum] = grpo.update(learner, run, groups, update_rows, seed=0)["loss"]
    steps_taken[accum] = jax.tree.map(lambda new, old: np.asarray(new) - old, run.params, before)
  assert np.isfinite(losses[1]) and losses[2] == pytest.approx(losses[1], rel=1e-5)
  assert any(np.abs(a).max() > 1e-4 for a in jax.tree.leaves(steps_taken[1]))
  for a, b in zip(jax.tree.leaves(steps_taken[1]), jax.tree.leaves(steps_taken[2])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)
  learner, run = learner_and_run(model, sampler, ppo_epochs=2, num_minibatches=2)
  update_rows, _ = grpo.score(learner, run, groups)
  assert update_rows.old_logprobs_BN is not None  # off-policy: the ratio needs π_old
  grpo.update(learner, run, groups, update_rows, seed=0)
  assert adam_count(run.opt_state) == 4


def test_rollout_metrics_compare_the_branches_with_their_roots(setting):
  model, sampler, batch = setting
  learner, _ = learner_and_run(model, sampler, tree=rl.TreeRollout(num_roots=1, branches=1))
  groups = scored_groups(batch, sampler, REWARDS_PG)  # per prompt: [root, branch]
  groups.shaped_B = groups.rewards_B - 0.25
  groups.rows.lengths_B[:] = [3, 1, 2, 2, 3, 3, 1, 1]
  groups.rows.truncated_B[[0, 4]] = True
  update_rows = types.SimpleNamespace(advantages_B=np.asarray([1, -1, 0, 0, 2, -2, 0, 0.0]))
  metrics = grpo.rollout_metrics(learner, groups, update_rows)
  assert metrics["tree/root_reward_mean"] == pytest.approx((0 + 1 + 1 + 0) / 4)
  assert metrics["tree/branch_reward_mean"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
  assert metrics["reward/overlong_penalty_mean"] == pytest.approx(0.25)
  assert metrics["response_length/max"] == 3
  assert metrics["response_length/mean"] == pytest.approx(2.0)
  assert metrics["response_length/truncated_frac"] == pytest.approx(0.25)
  assert metrics["advantages/abs_mean"] == pytest.approx(0.75)
  assert metrics["accuracy"] == pytest.approx(np.mean(REWARDS_PG))
