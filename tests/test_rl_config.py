"""Presets carry the numbers their sources give; configs refuse bad values with useful messages."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from metaphorstar_jax import rl


def test_metaphorstar_preset_is_tfq_grpo_as_coded():
  p = rl.preset("metaphorstar")
  loss, rollout = p.loss, p.rollout
  assert (loss.adv_estimator, loss.norm_adv_by_std_in_grpo, loss.adv_std_unbiased) == \
      ("grpo", True, True)
  assert loss.adv_eps == 1e-6
  assert (loss.loss_mode, loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == \
      ("vanilla", 0.2, 0.3, 3.0)
  assert loss.loss_agg_mode == "token-mean"
  assert (loss.use_kl_loss, loss.kl_loss_type, loss.kl_loss_coef, loss.use_kl_in_reward) == \
      (True, "low_var_kl", 1e-2, False)
  assert loss.entropy_coeff == 0.0 and loss.tis_cap is None
  assert not (loss.filter_groups or loss.overlong_buffer or loss.mask_truncated_completions)
  assert (rollout.n, rollout.temperature, rollout.top_p) == (5, 1.0, 0.99)
  assert rollout.max_response_length == 2048
  assert (rollout.val_temperature, rollout.val_top_p) == (0.5, 0.99)
  assert "MetaphorStar" in p.source


def test_other_presets_have_their_sources_numbers():
  grpo = rl.preset("grpo")
  assert grpo.loss.use_kl_loss and grpo.loss.kl_loss_coef == 0.001
  assert (grpo.loss.clip_ratio_low, grpo.loss.clip_ratio_high) == (0.2, 0.2)
  dr = rl.preset("dr_grpo").loss
  assert not dr.norm_adv_by_std_in_grpo and not dr.use_kl_loss
  assert dr.loss_agg_mode == "seq-mean-token-sum-norm"
  dapo = rl.preset("dapo")
  assert (dapo.loss.clip_ratio_low, dapo.loss.clip_ratio_high, dapo.loss.clip_ratio_c) == \
      (0.2, 0.28, 10.0)
  assert dapo.loss.filter_groups and dapo.loss.max_num_gen_batches == 10
  assert dapo.loss.overlong_buffer and dapo.loss.overlong_buffer_len == 4096
  assert not (dapo.loss.use_kl_loss or dapo.loss.use_kl_in_reward)
  assert (dapo.rollout.n, dapo.rollout.max_response_length) == (16, 20480)
  gspo = rl.preset("gspo").loss
  assert gspo.loss_mode == "gspo_token" and gspo.clip_ratio_c is None
  assert (gspo.clip_ratio_low, gspo.clip_ratio_high) == (3e-4, 4e-4)
  assert set(rl.PRESET_NAMES) == {"grpo", "dr_grpo", "dapo", "gspo", "metaphorstar"}
  assert all(rl.preset(name).source for name in rl.PRESET_NAMES)


def test_configs_hash_and_serve_as_static_jit_arguments():
  cfg = rl.preset("metaphorstar").loss
  assert hash(cfg) == hash(rl.preset("metaphorstar").loss)
  fn = jax.jit(lambda c, x: x * c.kl_loss_coef, static_argnums=0)
  assert float(fn(cfg, jnp.float32(2.0))) == pytest.approx(0.02)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.clip_ratio_low = 0.1


def test_replace_and_round_trip_through_a_dict():
  cfg = rl.preset("dapo").loss
  assert rl.LossConfig.from_dict(cfg.to_dict()) == cfg
  changed = cfg.replace(clip_ratio_high=0.3)
  assert changed.clip_ratio_high == 0.3 and cfg.clip_ratio_high == 0.28
  rollout = rl.preset("dapo").rollout
  assert rl.RolloutConfig.from_dict(rollout.to_dict()) == rollout
  with pytest.raises(ValueError, match="did you mean 'clip_ratio_high'"):
    cfg.replace(clip_ratio_hi=0.3)
  with pytest.raises(ValueError, match="did you mean 'temperature'"):
    rollout.replace(temprature=0.7)


@pytest.mark.parametrize("changes, message", [
    (dict(adv_estimator="dr_grpo"), "norm_adv_by_std_in_grpo=False"),
    (dict(scale_rewards="none"), "norm_adv_by_std_in_grpo=False"),
    (dict(loss_agg_mode="token-sum"), "loss_agg_mode='token-sum'"),
    (dict(loss_mode="cispo"), "loss_mode='cispo'"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c=1.0 must be > 1"),
    (dict(clip_ratio_low=1.0), "clip_ratio_low=1.0"),
    (dict(kl_penalty="full"), "'full' needs the whole vocabulary"),
    (dict(tis_cap=0.0), "tis_cap=0.0"),
    (dict(loss_agg_norm_length=0), "loss_agg_norm_length=0"),
    (dict(max_num_gen_batches=-1), "0 means no bound"),
])
def test_bad_loss_values_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    rl.LossConfig(**changes)


def test_bad_rollout_and_preset_values_are_refused():
  with pytest.raises(ValueError, match="temperature=0"):
    rl.RolloutConfig(temperature=0)
  with pytest.raises(ValueError, match="top_p=1.5"):
    rl.RolloutConfig(top_p=1.5)
  with pytest.raises(ValueError, match="max_response_length=0"):
    rl.RolloutConfig(max_response_length=0)
  with pytest.raises(ValueError, match="Did you mean 'dapo'"):
    rl.preset("dappo")
  dapo = rl.preset("dapo")
  with pytest.raises(ValueError, match="shorter than max_response_length"):
    rl.RLPreset(name="x", loss=dapo.loss, rollout=dapo.rollout.replace(max_response_length=1024),
                source="test")
  with pytest.raises(ValueError, match="RLOO needs rollout.n >= 2"):
    rl.RLPreset(name="x", loss=rl.LossConfig(adv_estimator="rloo"), rollout=rl.RolloutConfig(),
                source="test")
