"""The policy loss against a token-by-token NumPy reference for every loss mode and aggregation,
plus constructed clip cases, dual-clip, GSPO equivalences, TIS, entropy, gradients and masking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaphorstar_jax import rl

B, N = 5, 7


def reference_aggregate(values, mask, mode, norm_length=None):
  if mode == "token-mean":
    count = mask.sum()
    return sum(values[b, t] for b, t in zip(*np.nonzero(mask))) / max(count, 1)
  rows = []
  for b in range(values.shape[0]):
    kept = [values[b, t] for t in range(values.shape[1]) if mask[b, t]]
    if mode == "seq-mean-token-mean":
      rows.append(sum(kept) / len(kept) if kept else 0.0)
    elif mode == "seq-mean-token-sum":
      rows.append(sum(kept))
    else:
      rows.append(sum(kept) / (norm_length or values.shape[1]))
  return sum(rows) / values.shape[0]


def reference_kl(logp, ref, kind):
  if kind == "kl":
    return logp - ref
  x = min(max(ref - logp, -20.0), 20.0)
  return min(max(math.exp(x) - x - 1.0, -10.0), 10.0)


def reference_policy_loss(cfg, logp, old, adv, mask, ref=None, entropy=None, sampler=None):
  """Written from the formulas: per row, per valid token, then the aggregation."""
  per_token = np.zeros(logp.shape)
  for b in range(logp.shape[0]):
    valid = [t for t in range(logp.shape[1]) if mask[b, t]]
    if cfg.loss_mode == "vanilla":
      log_ratio = {t: logp[b, t] - old[b, t] for t in valid}
    else:
      seq = sum(logp[b, t] - old[b, t] for t in valid) / len(valid) if valid else 0.0
      log_ratio = {t: seq for t in valid}
    a = adv[b]
    for t in valid:
      r = math.exp(min(max(log_ratio[t], -cfg.log_ratio_clamp), cfg.log_ratio_clamp))
      clipped_r = min(max(r, 1 - cfg.clip_ratio_low), 1 + cfg.clip_ratio_high)
      loss = max(-a * r, -a * clipped_r)
      if cfg.clip_ratio_c is not None and a < 0:
        loss = min(loss, -a * cfg.clip_ratio_c)
      if cfg.tis_cap is not None:
        loss *= min(math.exp(old[b, t] - sampler[b, t]), cfg.tis_cap)
      per_token[b, t] = loss
  total = reference_aggregate(per_token, mask, cfg.loss_agg_mode, cfg.loss_agg_norm_length)
  if cfg.use_kl_loss:
    kl = np.zeros(logp.shape)
    for b, t in zip(*np.nonzero(mask)):
      kl[b, t] = reference_kl(logp[b, t], ref[b, t], cfg.kl_loss_type)
    total += cfg.kl_loss_coef * reference_aggregate(kl, mask, cfg.loss_agg_mode,
                                                    cfg.loss_agg_norm_length)
  if cfg.entropy_coeff:
    total -= cfg.entropy_coeff * reference_aggregate(entropy, mask, cfg.loss_agg_mode,
                                                     cfg.loss_agg_norm_length)
  return total


def random_batch(seed, spread=0.4):
  """Ratios spread enough that some tokens clip; ragged rows and one fully masked row."""
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.05, 3.0, size=(B, N))
  old = logp + rng.normal(scale=spread, size=(B, N))
  ref = logp + rng.normal(scale=0.3, size=(B, N))
  sampler = old + rng.normal(scale=0.3, size=(B, N))
  entropy = rng.uniform(0.0, 2.0, size=(B, N))
  adv = rng.normal(size=B)
  lengths = np.array([N, 4, 0, 1, 6])
  mask = np.arange(N)[None, :] < lengths[:, None]
  for x in (logp, old, ref, sampler, entropy):
    x[~mask] = np.nan  # padding garbage must stay out of values and gradients
  return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, entropy=entropy, sampler=sampler)


def run(cfg, batch, **extra):
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return rl.policy_loss(cfg, f32(batch["logp"]), f32(batch["old"]), f32(batch["adv"]),
                        jnp.asarray(batch["mask"]), ref_logprobs_BN=f32(batch["ref"]),
                        entropy_BN=f32(batch["entropy"]), sampler_logprobs_BN=f32(batch["sampler"]),
                        **extra)


def check_against_reference(cfg, batch):
  loss, metrics = run(cfg, batch)
  want = reference_policy_loss(cfg, batch["logp"], batch["old"], batch["adv"], batch["mask"],
                               batch["ref"], batch["entropy"], batch["sampler"])
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  return loss, metrics


LOSS_CASES = [
    dict(loss_mode="vanilla"),
    dict(loss_mode="vanilla", clip_ratio_high=0.28, clip_ratio_c=None),
    dict(loss_mode="vanilla", clip_ratio_high=0.3, clip_ratio_c=3.0, use_kl_loss=True,
         kl_loss_type="low_var_kl", kl_loss_coef=1e-2),
    dict(loss_mode="vanilla", use_kl_loss=True, kl_loss_type="kl", kl_loss_coef=0.1,
         entropy_coeff=0.01),
    dict(loss_mode="vanilla", tis_cap=2.0),
    dict(loss_mode="gspo", clip_ratio_low=0.05, clip_ratio_high=0.1, clip_ratio_c=None),
    dict(loss_mode="gspo_token", clip_ratio_low=0.05, clip_ratio_high=0.1, clip_ratio_c=None),
]


@pytest.mark.parametrize("mode", rl.LOSS_AGG_MODES)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_policy_loss_matches_reference(case, mode):
  cfg = rl.LossConfig(loss_agg_mode=mode, **LOSS_CASES[case])
  check_against_reference(cfg, random_batch(case))


def test_norm_length_reaches_the_loss():
  cfg = rl.LossConfig(loss_agg_mode="seq-mean-token-sum-norm", loss_agg_norm_length=2048)
  check_against_reference(cfg, random_batch(11))


def test_a_wrong_reference_would_fail():
  # Clip-higher matters on this batch: the symmetric-clip reference disagrees.
  batch = random_batch(3, spread=0.8)
  cfg = rl.LossConfig(clip_ratio_low=0.2, clip_ratio_high=0.3)
  loss, _ = run(cfg, batch)
  symmetric = reference_policy_loss(cfg.replace(clip_ratio_high=0.2), batch["logp"], batch["old"],
                                    batch["adv"], batch["mask"])
  assert abs(float(loss) - symmetric) > 1e-4


def test_metrics_match_reference():
  batch = random_batch(5, spread=0.8)
  cfg = rl.preset("metaphorstar").loss
  _, metrics = check_against_reference(cfg, batch)
  mask, logp, old, adv = batch["mask"], batch["logp"], batch["old"], batch["adv"]
  rows, cols = np.nonzero(mask)
  log_ratio = logp[rows, cols] - old[rows, cols]
  ratio = np.exp(log_ratio)
  a = adv[rows]
  np.testing.assert_allclose(float(metrics["ppo_kl"]), np.mean(-log_ratio), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["approx_kl"]), np.mean(ratio - 1 - log_ratio),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ratio_mean"]), ratio.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ratio_max"]), ratio.max(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ratio_min"]), ratio.min(), rtol=1e-5)
  high = np.mean((a > 0) & (ratio > 1.3))
  low = np.mean((a < 0) & (ratio < 0.8))
  dual = np.mean((a < 0) & (ratio > 3.0))
  np.testing.assert_allclose(float(metrics["pg_clipfrac_high"]), high, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pg_clipfrac_low"]), low, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pg_clipfrac_dual"]), dual, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pg_clipfrac"]), high + low, atol=1e-6)
  assert high + low > 0  # the batch does exercise the clip
  assert float(metrics["num_tokens"]) == mask.sum()
  kl = np.mean([reference_kl(logp[b, t], batch["ref"][b, t], "low_var_kl")
                for b, t in zip(rows, cols)])
  np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), np.mean(batch["entropy"][rows, cols]),
                             rtol=1e-5)


# One token per row: ratio r with advantage A, for hand-checkable clipping.
RATIOS = np.array([0.5, 0.9, 1.2, 1.5, 5.0, 0.5, 0.9, 1.2, 1.5, 5.0, 5.0])
ADVS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0])


def constructed_loss(clip_ratio_c):
  out = rl.clipped_policy_loss(jnp.log(jnp.asarray(RATIOS, jnp.float32))[:, None],
                               jnp.asarray(ADVS, jnp.float32)[:, None], clip_ratio_low=0.2,
                               clip_ratio_high=0.3, clip_ratio_c=clip_ratio_c)
  return jax.tree.map(lambda x: np.asarray(x)[:, 0], out)


def test_clip_flags_and_values_on_constructed_cases():
  out = constructed_loss(clip_ratio_c=3.0)
  np.testing.assert_array_equal(out.clipped_high_BN, [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.clipped_low_BN, [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.clipped_dual_BN, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
  #            A=+1: r<1-lo keeps r, r>1+hi caps at 1.3 | A=-1: floor 0.8, dual cap 3.0 | A=0
  want = [-0.5, -0.9, -1.2, -1.3, -1.3, 0.8, 0.9, 1.2, 1.5, 3.0, 0.0]
  np.testing.assert_allclose(out.loss_BN, want, rtol=1e-6)


def test_dual_clip_only_touches_negative_advantages():
  with_dual, without = constructed_loss(3.0), constructed_loss(None)
  positive = ADVS > 0
  np.testing.assert_array_equal(with_dual.loss_BN[positive], without.loss_BN[positive])
  assert not np.any(without.clipped_dual_BN)
  np.testing.assert_allclose(without.loss_BN[9], 5.0, rtol=1e-6)  # unbounded without dual-clip
  np.testing.assert_allclose(with_dual.loss_BN[9], 3.0, rtol=1e-6)
  # A bigger constant, as in DAPO's 10.0, leaves this token alone.
  np.testing.assert_allclose(constructed_loss(10.0).loss_BN[9], 5.0, rtol=1e-6)


def test_dual_clipped_tokens_get_no_gradient():
  log_ratio = jnp.log(jnp.asarray(RATIOS, jnp.float32))[:, None]
  grad = jax.grad(lambda lr: jnp.sum(rl.clipped_policy_loss(
      lr, jnp.asarray(ADVS, jnp.float32)[:, None], clip_ratio_low=0.2, clip_ratio_high=0.3,
      clip_ratio_c=3.0).loss_BN))(log_ratio)
  grad = np.asarray(grad)[:, 0]
  # d(-A r)/d log r = -A r where unclipped; 0 where any clip is active or A = 0.
  want = np.where([1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0], -ADVS * RATIOS, 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_gradients_are_finite_and_zero_on_masked_tokens(case):
  cfg = rl.LossConfig(loss_agg_mode="seq-mean-token-mean", **LOSS_CASES[case])
  batch = random_batch(20 + case)
  mask = batch["mask"]

  def loss_of(logp, entropy):
    return rl.policy_loss(cfg, logp, jnp.asarray(batch["old"], jnp.float32),
                          jnp.asarray(batch["adv"], jnp.float32), jnp.asarray(mask),
                          ref_logprobs_BN=jnp.asarray(batch["ref"], jnp.float32),
                          entropy_BN=entropy,
                          sampler_logprobs_BN=jnp.asarray(batch["sampler"], jnp.float32))[0]

  grads = jax.grad(loss_of, argnums=(0, 1))(jnp.asarray(batch["logp"], jnp.float32),
                                            jnp.asarray(batch["entropy"], jnp.float32))
  for grad in grads:
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~mask], 0.0)
  assert np.any(np.asarray(grads[0])[mask] != 0)


def test_on_policy_gradient_is_minus_advantage_over_token_count():
  batch = random_batch(7)
  cfg = rl.LossConfig()
  mask = jnp.asarray(batch["mask"])
  grad = jax.grad(lambda lp: rl.policy_loss(cfg, lp, None, jnp.asarray(batch["adv"]), mask)[0])(
      jnp.asarray(batch["logp"], jnp.float32))
  want = np.where(batch["mask"], -batch["adv"][:, None] / batch["mask"].sum(), 0.0)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


def loss_and_grad(cfg, batch):
  """(loss, d loss / d logprobs) with old log-probs and advantages from `batch`."""
  def fn(logp):
    return rl.policy_loss(cfg, logp, jnp.asarray(batch["old"], jnp.float32),
                          jnp.asarray(batch["adv"], jnp.float32), jnp.asarray(batch["mask"]))[0]
  logp = jnp.asarray(np.nan_to_num(batch["logp"]), jnp.float32)
  loss, grad = jax.value_and_grad(fn)(logp)
  return float(loss), np.asarray(grad)


def test_gspo_equals_token_ppo_when_ratios_are_equal_within_a_row():
  rng = np.random.default_rng(8)
  batch = random_batch(8)
  shift = rng.normal(scale=0.2, size=(B, 1))
  batch["old"] = batch["logp"] - shift  # every token of row b has log-ratio shift[b]
  base = dict(clip_ratio_low=0.1, clip_ratio_high=0.15, clip_ratio_c=3.0,
              loss_agg_mode="seq-mean-token-mean")
  results = {mode: loss_and_grad(rl.LossConfig(loss_mode=mode, **base), batch)
             for mode in rl.LOSS_MODES}
  for mode in ("gspo", "gspo_token"):
    np.testing.assert_allclose(results[mode][0], results["vanilla"][0], rtol=1e-5)
    np.testing.assert_allclose(results[mode][1], results["vanilla"][1], rtol=1e-4, atol=1e-7)


def test_gspo_forms_agree_with_each_other_but_not_with_ppo_on_unequal_ratios():
  batch = random_batch(9)
  base = dict(clip_ratio_low=0.3, clip_ratio_high=0.3, clip_ratio_c=None,
              loss_agg_mode="seq-mean-token-mean")
  results = {mode: loss_and_grad(rl.LossConfig(loss_mode=mode, **base), batch)
             for mode in rl.LOSS_MODES}
  np.testing.assert_allclose(results["gspo"][0], results["gspo_token"][0], rtol=1e-5)
  np.testing.assert_allclose(results["gspo"][1], results["gspo_token"][1], rtol=1e-4, atol=1e-7)
  assert abs(results["gspo"][0] - results["vanilla"][0]) > 1e-4


def test_tis_weights_are_capped_and_detached():
  batch = random_batch(10, spread=0.3)
  batch["sampler"] = batch["old"] - 1.5 * np.sign(np.random.default_rng(0).normal(size=(B, N)))
  cfg = rl.LossConfig(tis_cap=2.0)
  _, metrics = check_against_reference(cfg, batch)
  mask = batch["mask"]
  rows, cols = np.nonzero(mask)
  w = np.minimum(np.exp(batch["old"][rows, cols] - batch["sampler"][rows, cols]), 2.0)
  np.testing.assert_allclose(float(metrics["tis_weight_mean"]), w.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["tis_capped_frac"]), np.mean(w == 2.0), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["sampler_trainer_abs_diff"]), 1.5, rtol=1e-5)

  def loss_of(sampler, old):
    return rl.policy_loss(cfg, jnp.asarray(batch["logp"], jnp.float32), old,
                          jnp.asarray(batch["adv"], jnp.float32), jnp.asarray(mask),
                          sampler_logprobs_BN=sampler)[0]

  grads = jax.grad(loss_of, argnums=(0, 1))(jnp.asarray(batch["sampler"], jnp.float32),
                                            jnp.asarray(batch["old"], jnp.float32))
  for grad in grads:
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_entropy_bonus_lowers_the_loss_by_its_aggregate():
  batch = random_batch(12)
  cfg = rl.LossConfig(entropy_coeff=0.05)
  loss_with, metrics = run(cfg, batch)
  loss_without, _ = run(cfg.replace(entropy_coeff=0.0), batch)
  np.testing.assert_allclose(float(loss_without - loss_with), 0.05 * float(metrics["entropy_loss"]),
                             rtol=1e-5)
  grad = jax.grad(lambda e: rl.policy_loss(cfg, jnp.asarray(batch["logp"], jnp.float32),
                                           jnp.asarray(batch["old"], jnp.float32),
                                           jnp.asarray(batch["adv"], jnp.float32),
                                           jnp.asarray(batch["mask"]), entropy_BN=e)[0])(
      jnp.asarray(batch["entropy"], jnp.float32))
  np.testing.assert_allclose(np.asarray(grad),
                             np.where(batch["mask"], -0.05 / batch["mask"].sum(), 0.0), rtol=1e-5)


def test_fully_masked_batch_is_finite_and_flat():
  batch = random_batch(13)
  batch["mask"] = np.zeros((B, N), bool)
  cfg = rl.preset("metaphorstar").loss.replace(entropy_coeff=0.01, tis_cap=2.0)
  loss, metrics = run(cfg, batch)
  assert float(loss) == 0.0
  assert all(float(v) == 0.0 for v in metrics.values())
  grad = jax.grad(lambda lp: run(cfg, dict(batch, logp=lp))[0])(
      jnp.asarray(batch["logp"], jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_per_token_advantages_and_jit_with_static_config():
  batch = random_batch(14)
  cfg = rl.preset("dapo").loss
  adv_BN = np.repeat(batch["adv"][:, None], N, axis=1)
  fn = jax.jit(rl.policy_loss, static_argnums=0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  per_token, _ = fn(cfg, f32(batch["logp"]), f32(batch["old"]), f32(adv_BN),
                    jnp.asarray(batch["mask"]))
  per_row, _ = fn(cfg, f32(batch["logp"]), f32(batch["old"]), f32(batch["adv"]),
                  jnp.asarray(batch["mask"]))
  np.testing.assert_allclose(float(per_token), float(per_row), rtol=1e-6)


def test_micro_batches_sum_to_the_full_loss_with_global_counts():
  batch = random_batch(15)
  batch["mask"][2, :3] = True  # no empty row, so every row is a real sequence
  for mode in rl.LOSS_AGG_MODES:
    cfg = rl.LossConfig(loss_agg_mode=mode, use_kl_loss=True)
    full, _ = run(cfg, batch)
    counts = dict(token_count=int(batch["mask"].sum()), seq_count=B)
    parts = [run(cfg, {k: v[rows] for k, v in batch.items()}, **counts)[0]
             for rows in (slice(0, 2), slice(2, B))]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=2e-5, atol=1e-6)


def test_missing_inputs_are_reported():
  logp = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3))
  adv = jnp.zeros(2)
  with pytest.raises(ValueError, match="ref_logprobs_BN"):
    rl.policy_loss(rl.LossConfig(use_kl_loss=True), logp, logp, adv, mask)
  with pytest.raises(ValueError, match="entropy_BN"):
    rl.policy_loss(rl.LossConfig(entropy_coeff=0.1), logp, logp, adv, mask)
  with pytest.raises(ValueError, match="sampler_logprobs_BN"):
    rl.policy_loss(rl.LossConfig(tis_cap=2.0), logp, logp, adv, mask)
  with pytest.raises(ValueError, match="advantages"):
    rl.policy_loss(rl.LossConfig(), logp, logp, jnp.zeros(3), mask)
