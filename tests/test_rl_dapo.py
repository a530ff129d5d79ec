"""DAPO pieces on hand-made cases: group filter, kept-group selection, the draw-more decision,
the soft overlong penalty, overlong filtering and their config-driven wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import rl


def test_filter_keeps_groups_whose_rewards_differ():
  acc = jnp.array([[1.0, 1.0, 1.0, 1.0],   # all solved: no signal
                   [0.0, 1.0, 0.0, 0.0],   # mixed: keep
                   [0.0, 0.0, 0.0, 0.0],   # all failed: no signal
                   [0.1, 0.1, 0.1, 0.1],   # equal non-integers: exact test drops it
                   [0.5, 0.5, 0.5, 0.5000001]])
  keep_P, keep_B = rl.filter_groups_mask(acc)
  np.testing.assert_array_equal(np.asarray(keep_P), [False, True, False, False, True])
  np.testing.assert_array_equal(np.asarray(keep_B).reshape(5, 4),
                                np.repeat(np.asarray(keep_P)[:, None], 4, axis=1))


def test_filter_with_flat_groups_padding_and_singletons():
  values = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 7.0, 0.0, 3.0])
  ids = jnp.array([0, 0, 1, 1, 2, 2, 3, 4])
  valid = jnp.array([True, True, True, True, True, False, True, False])
  keep_P, keep_B = rl.filter_groups_mask(values, ids, 6, valid)
  # group 0 mixed; 1 all equal; 2 one live row (kept, as verl does); 3 singleton; 4 no live row;
  # 5 has no rows at all.
  np.testing.assert_array_equal(np.asarray(keep_P), [True, False, True, True, False, False])
  np.testing.assert_array_equal(np.asarray(keep_B),
                                [True, True, False, False, True, False, True, False])



def test_draw_more_decision():
  enough = rl.dynamic_sampling_decision(64, 64, 1, 10)
  assert not enough.draw_more and not enough.exhausted and enough.message == ""
  more = rl.dynamic_sampling_decision(40, 64, 3, 10)
  assert more.draw_more and not more.exhausted
  unbounded = rl.dynamic_sampling_decision(40, 64, 500, 0)
  assert unbounded.draw_more
  stop = rl.dynamic_sampling_decision(40, 64, 10, 10)
  assert not stop.draw_more and stop.exhausted
  assert "40 of the 64" in stop.message and "max_num_gen_batches=10" in stop.message


def test_overlong_penalty_ramps_over_the_buffer():
  lengths = jnp.array([0, 10, 15, 16, 18, 20, 25])
  got = rl.overlong_penalty(lengths, max_response_length=20, overlong_buffer_len=5,
                            penalty_factor=1.0)
  np.testing.assert_allclose(np.asarray(got), [0, 0, 0, -0.2, -0.6, -1.0, -1.0], atol=1e-6)
  half = rl.overlong_penalty(lengths, max_response_length=20, overlong_buffer_len=5,
                             penalty_factor=0.5)
  np.testing.assert_allclose(np.asarray(half), np.asarray(got) * 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="overlong_buffer_len=20"):
    rl.overlong_penalty(lengths, max_response_length=20, overlong_buffer_len=20,
                        penalty_factor=1.0)


def test_dapo_preset_penalty_at_its_budget():
  preset = rl.preset("dapo")
  rewards = jnp.array([1.0, 1.0, 0.0, 1.0])
  lengths = jnp.array([16384, 18432, 20480, 100])
  got = rl.shape_rewards(preset.loss, preset.rollout, rewards, lengths)
  np.testing.assert_allclose(np.asarray(got), [1.0, 0.5, -1.0, 1.0], atol=1e-6)
  plain = rl.preset("metaphorstar")
  np.testing.assert_array_equal(np.asarray(rl.shape_rewards(plain.loss, plain.rollout, rewards,
                                                            lengths)), np.asarray(rewards))


def test_truncated_completions_leave_the_loss():
  mask = jnp.ones((3, 4), jnp.int32)
  truncated = jnp.array([False, True, False])
  got = rl.mask_truncated(mask, truncated)
  np.testing.assert_array_equal(np.asarray(got), [[1] * 4, [0] * 4, [1] * 4])
  assert got.dtype == mask.dtype
  on = rl.LossConfig(mask_truncated_completions=True)
  np.testing.assert_array_equal(np.asarray(rl.loss_mask(on, mask, truncated)), np.asarray(got))
  assert rl.loss_mask(rl.LossConfig(), mask, truncated) is mask
  # A masked row then contributes nothing to the loss and gets no gradient.
  logp = jnp.full((3, 4), -1.0)
  grad = jax.grad(lambda lp: rl.policy_loss(rl.LossConfig(), lp, None, jnp.ones(3), got)[0])(logp)
  np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
