"""The optimizer: warmup then constant or cosine learning rates, AdamW behind gradient clipping,
frozen parameters that never move, and non-finite updates skipped until optax gives up."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import optim_config

from metaphorstar_jax.training import optimizer


def config(**fields):
  cfg = optim_config()
  cfg.update(fields)
  return cfg


def rates(cfg, steps):
  schedule = optimizer.learning_rate_schedule(cfg)
  return np.asarray([float(schedule(step)) for step in steps])


def test_constant_schedule_with_and_without_warmup():
  np.testing.assert_allclose(rates(config(learning_rate=0.1), [0, 5, 100]), [0.1] * 3)
  # Linear from 0 over warmup_steps, then the peak.
  np.testing.assert_allclose(rates(config(learning_rate=0.1, warmup_steps=4), [0, 1, 2, 4, 9]),
                             [0.0, 0.025, 0.05, 0.1, 0.1], rtol=1e-6)


def test_cosine_schedule_decays_from_the_peak_to_the_final_fraction_after_warmup():
  cfg = config(learning_rate=0.2, warmup_steps=2, total_steps=12, schedule="cosine",
               final_lr_fraction=0.1)
  got = rates(cfg, [0, 1, 2, 7, 12, 20])
  # Cosine over the 10 steps after warmup: halfway is the mean of peak and floor.
  np.testing.assert_allclose(got, [0.0, 0.1, 0.2, (0.2 + 0.02) / 2, 0.02, 0.02], rtol=1e-5)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match="Unknown learning-rate schedule 'linear'"):
    optimizer.learning_rate_schedule(config(schedule="linear"))


def test_first_update_is_adamw_on_clipped_gradients():
  params = {"w": jnp.asarray([1.0, -2.0, 3.0]), "b": jnp.asarray([0.5])}
  grads = {"w": jnp.asarray([3.0, 0.0, -4.0]), "b": jnp.asarray([0.0])}  # global norm 5
  tx = optimizer.make_optimizer(config(learning_rate=0.1, grad_clip_norm=1.0, weight_decay=0.01))
  updates, state = tx.update(grads, tx.init(params), params)
  # Adam's moments see the gradients scaled to norm 1: mu = (1 - b1) * g / 5.
  np.testing.assert_allclose(np.asarray(state.inner_state[1][0].mu["w"]),
                             0.1 * np.asarray([3.0, 0.0, -4.0]) / 5, rtol=1e-6)
  # Adam's first step is the gradient's sign; decoupled weight decay adds wd * param; times lr.
  sign = np.sign(np.asarray(grads["w"]))
  np.testing.assert_allclose(np.asarray(updates["w"]),
                             -0.1 * (sign + 0.01 * np.asarray(params["w"])), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.1 * 0.01 * 0.5, rtol=1e-5)
  # Without clipping the moments hold the raw gradients.
  unclipped = optimizer.make_optimizer(config(grad_clip_norm=0.0))
  _, state = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(np.asarray(state.inner_state[0][0].mu["w"]),
                             0.1 * np.asarray([3.0, 0.0, -4.0]), rtol=1e-6)


def test_frozen_parameters_get_no_update_and_need_the_parameters():
  params = {"visual": {"kernel": jnp.ones((2, 2))}, "language_model": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  cfg = config(frozen=(r"^visual/",))
  tx = optimizer.make_optimizer(cfg, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.asarray(updates["visual"]["kernel"]).any()
  assert np.all(np.asarray(updates["language_model"]["kernel"]) < 0)
  assert optimizer.frozen_labels(params, cfg.frozen) == {
      "visual": {"kernel": "frozen"}, "language_model": {"kernel": "trained"}}
  with pytest.raises(ValueError, match="needs the parameters"):
    optimizer.make_optimizer(cfg)


def test_non_finite_updates_are_skipped_and_counted_until_optax_gives_up():
  params = {"w": jnp.asarray([1.0, 2.0])}
  finite, bad = {"w": jnp.asarray([1.0, 1.0])}, {"w": jnp.asarray([jnp.nan, 1.0])}
  tx = optimizer.make_optimizer(config(max_consecutive_nonfinite=2))
  state = tx.init(params)
  for in_a_row in (1, 2):
    updates, state = tx.update(bad, state, params)
    assert not np.asarray(updates["w"]).any() and int(state.notfinite_count) == in_a_row
  # Moments untouched by the skipped steps: the next finite update is a first step.
  np.testing.assert_array_equal(np.asarray(state.inner_state[1][0].mu["w"]), [0.0, 0.0])
  updates, state = tx.update(finite, state, params)
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2
  assert np.all(np.isfinite(np.asarray(updates["w"]))) and np.asarray(updates["w"]).all()
  # After max_consecutive_nonfinite in a row optax applies the next non-finite update, NaN and
  # all: why the trainer stops the run first (state.check_updates).
  for _ in range(2):
    updates, state = tx.update(bad, state, params)
  updates, state = tx.update(bad, state, params)
  assert np.isnan(np.asarray(optax.apply_updates(params, updates)["w"])).any()
