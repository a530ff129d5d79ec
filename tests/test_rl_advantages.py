"""GRPO, Dr.GRPO and RLOO advantages against NumPy references; ties, singletons, flat groups."""

import collections

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import rl


def reference_grpo(rewards, ids, valid, *, norm_by_std, scope="group", ddof=1, eps=1e-6):
  """verl's compute_grpo_outcome_advantage, re-derived with a dict of groups (plus TRL's batch
  scale): mean 0 / std 1 for a group of one."""
  groups = collections.defaultdict(list)
  for r, g, v in zip(rewards, ids, valid):
    if v:
      groups[g].append(r)
  live = [r for r, v in zip(rewards, valid) if v]
  batch_std = np.std(live, ddof=ddof) if len(live) > 1 else 1.0
  out = []
  for r, g, v in zip(rewards, ids, valid):
    if not v:
      out.append(0.0)
      continue
    members = groups[g]
    mean, std = (np.mean(members), np.std(members, ddof=ddof)) if len(members) > 1 else (0.0, 1.0)
    if scope == "batch":
      std = batch_std
    out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
  return np.array(out)


def reference_rloo(rewards, ids, valid):
  out = []
  for i, (r, g, v) in enumerate(zip(rewards, ids, valid)):
    if not v:
      out.append(0.0)
      continue
    others = [rewards[j] for j in range(len(rewards))
              if j != i and ids[j] == g and valid[j]]
    out.append(r - np.mean(others) if others else r)
  return np.array(out)


def grid_ids(num_prompts, group_size):
  return np.repeat(np.arange(num_prompts), group_size)


# Rewards in MetaphorStar's {0, 0.5, 1}, with a tied group, an all-equal group and a spread group.
GRID = np.array([[1.0, 0.5, 0.5, 0.0, 1.0],
                 [0.5, 0.5, 0.5, 0.5, 0.5],
                 [1.0, 1.0, 0.0, 0.0, 0.5],
                 [0.2, -1.3, 2.7, 0.9, 0.0]])


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_grpo_matches_reference(norm_by_std, scope, unbiased):
  got = rl.grpo_advantages(jnp.asarray(GRID), norm_by_std=norm_by_std, scale_rewards=scope,
                           unbiased=unbiased, eps=1e-6)
  ids = grid_ids(*GRID.shape)
  want = reference_grpo(GRID.ravel(), ids, np.ones(ids.size, bool), norm_by_std=norm_by_std,
                        scope=scope, ddof=1 if unbiased else 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_default_std_is_unbiased_and_the_biased_reference_fails():
  got = np.asarray(rl.grpo_advantages(jnp.asarray(GRID)))
  ids, valid = grid_ids(*GRID.shape), np.ones(GRID.size, bool)
  np.testing.assert_allclose(got, reference_grpo(GRID.ravel(), ids, valid, norm_by_std=True),
                             rtol=1e-5, atol=1e-6)
  biased = reference_grpo(GRID.ravel(), ids, valid, norm_by_std=True, ddof=0)
  assert not np.allclose(got, biased, rtol=1e-3)


def test_all_equal_group_gets_zero_advantage():
  got = np.asarray(rl.grpo_advantages(jnp.asarray(GRID))).reshape(GRID.shape)
  np.testing.assert_array_equal(got[1], 0.0)
  # Ties inside a spread group share one advantage.
  assert got[0, 1] == got[0, 2] and got[0, 0] == got[0, 4]


def test_metaphorstar_rewards_give_known_z_scores():
  # [1, 0, 0.5, 0.5, 0.5]: mean 0.5, unbiased std sqrt(0.125).
  got = rl.compute_advantages(rl.preset("metaphorstar").loss, jnp.array([[1.0, 0.0, 0.5, 0.5,
                                                                             0.5]]))
  std = np.sqrt(0.125)
  np.testing.assert_allclose(np.asarray(got), [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0, 0, 0],
                             rtol=1e-6)


def test_group_size_one_follows_verl():
  rewards = jnp.array([[0.7], [0.0], [-2.0]])
  np.testing.assert_allclose(np.asarray(rl.grpo_advantages(rewards, eps=1e-6)),
                             [0.7 / (1 + 1e-6), 0.0, -2.0 / (1 + 1e-6)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rl.grpo_advantages(rewards, norm_by_std=False)),
                             [0.7, 0.0, -2.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rl.rloo_advantages(rewards)), [0.7, 0.0, -2.0])
  assert np.all(np.isfinite(np.asarray(rl.grpo_advantages(rewards, scale_rewards="batch"))))


def test_rloo_matches_reference():
  ids = grid_ids(*GRID.shape)
  got = rl.rloo_advantages(jnp.asarray(GRID))
  np.testing.assert_allclose(np.asarray(got),
                             reference_rloo(GRID.ravel(), ids, np.ones(ids.size, bool)),
                             rtol=1e-5, atol=1e-6)
  # Not the plain mean baseline: that reference would fail.
  dr = rl.grpo_advantages(jnp.asarray(GRID), norm_by_std=False)
  assert not np.allclose(np.asarray(got), np.asarray(dr))


def test_flat_uneven_groups_with_padding_rows():
  rng = np.random.default_rng(0)
  ids = np.array([2, 0, 0, 1, 2, 2, 0, 3, 1, 0])  # group 3 is a singleton, group sizes differ
  rewards = rng.normal(size=ids.size)
  valid = np.ones(ids.size, bool)
  valid[[5, 8]] = False  # group 1 drops to one live row
  rewards[~valid] = 1e6  # garbage on padding rows must not move any statistic
  kwargs = dict(group_ids_B=jnp.asarray(ids), num_groups=5, valid_B=jnp.asarray(valid))
  for norm in (True, False):
    got = rl.grpo_advantages(jnp.asarray(rewards), norm_by_std=norm, **kwargs)
    np.testing.assert_allclose(np.asarray(got),
                               reference_grpo(rewards, ids, valid, norm_by_std=norm),
                               rtol=1e-5, atol=1e-6)
  got = rl.rloo_advantages(jnp.asarray(rewards), **kwargs)
  np.testing.assert_allclose(np.asarray(got), reference_rloo(rewards, ids, valid), rtol=1e-5,
                             atol=1e-6)


def test_grid_and_flat_forms_agree_and_jit():
  flat = jnp.asarray(GRID.ravel())
  ids = jnp.asarray(grid_ids(*GRID.shape))
  fn = jax.jit(lambda r, i: rl.grpo_advantages(r, i, num_groups=GRID.shape[0]))
  np.testing.assert_allclose(np.asarray(fn(flat, ids)),
                             np.asarray(rl.grpo_advantages(jnp.asarray(GRID))), rtol=1e-6)


def test_compute_advantages_dispatches_on_config():
  grid = jnp.asarray(GRID)
  dr = rl.compute_advantages(rl.preset("dr_grpo").loss, grid)
  np.testing.assert_allclose(np.asarray(dr), np.asarray(rl.grpo_advantages(grid,
                                                                            norm_by_std=False)))
  rloo = rl.compute_advantages(rl.LossConfig(adv_estimator="rloo"), grid)
  np.testing.assert_allclose(np.asarray(rloo), np.asarray(rl.rloo_advantages(grid)))


def test_input_errors_say_what_to_pass():
  with pytest.raises(ValueError, match="group_ids_B"):
    rl.grpo_advantages(jnp.ones(4))
  with pytest.raises(ValueError, match="already say their groups"):
    rl.grpo_advantages(jnp.ones((2, 2)), jnp.zeros(4, int), 2)
  with pytest.raises(ValueError, match="one group id per row"):
    rl.grpo_advantages(jnp.ones(4), jnp.zeros(3, int), 1)
  with pytest.raises(ValueError, match="scale_rewards"):
    rl.grpo_advantages(jnp.ones((2, 2)), scale_rewards="none")


# Property tests run on one padded [4, 6] shape (one compilation): each group's live size is drawn
# from 1..6 and the rest of its row is masked out through `valid_B`.
PROP_P, PROP_G = 4, 6
PROP_IDS = jnp.asarray(grid_ids(PROP_P, PROP_G))


@jax.jit
def _property_advantages(rewards_B, valid_B):
  kwargs = dict(group_ids_B=PROP_IDS, num_groups=PROP_P, valid_B=valid_B)
  return (rl.grpo_advantages(rewards_B, **kwargs),
          rl.grpo_advantages(rewards_B, norm_by_std=False, **kwargs),
          rl.rloo_advantages(rewards_B, **kwargs))


reward_grids = hnp.arrays(np.float32, (PROP_P, PROP_G),
                          elements=st.floats(-5, 5, width=32).map(lambda x: round(x, 2)))
live_sizes = hnp.arrays(np.int64, (PROP_P,), elements=st.integers(2, PROP_G))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(rewards=reward_grids, sizes=live_sizes)
def test_group_advantages_sum_to_zero(rewards, sizes):
  valid = np.arange(PROP_G)[None, :] < sizes[:, None]
  for advantages in _property_advantages(jnp.asarray(rewards.ravel()), jnp.asarray(valid.ravel())):
    grid = np.asarray(advantages).reshape(PROP_P, PROP_G)
    np.testing.assert_allclose(grid.sum(axis=1), 0.0, atol=1e-3)
    np.testing.assert_array_equal(grid[~valid], 0.0)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(rewards=reward_grids, scale=st.floats(0.5, 4.0), shift=st.floats(-3, 3))
def test_z_scores_ignore_affine_reward_changes(rewards, scale, shift):
  hypothesis.assume(np.all(np.ptp(rewards, axis=1) > 0.1))
  valid = jnp.ones(PROP_P * PROP_G, bool)
  base = _property_advantages(jnp.asarray(rewards.ravel()), valid)[0]
  moved = _property_advantages(jnp.asarray((rewards * scale + shift).ravel(), jnp.float32),
                               valid)[0]
  np.testing.assert_allclose(np.asarray(moved), np.asarray(base), rtol=1e-3, atol=1e-3)
