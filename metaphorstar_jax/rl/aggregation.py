"""Reducing a per-token loss to a scalar, under verl's `loss_agg_mode` names.

Shape letters (README "Shape letters"): B rows (completions), N completion tokens.

With ℓ the per-token loss, m the 0/1 mask, n_b = Σ_t m_bt the valid tokens of row b, n = Σ_b n_b
the valid tokens of the batch, s the number of sequences and λ the normalisation length (counts,
not axes):

  token-mean               Σ_bt ℓ m / n                  (DAPO, EasyR1 "token", TRL "dapo"/"bnpo")
  seq-mean-token-mean      (1/s) Σ_b (Σ_t ℓ m / n_b)      (original GRPO, TRL "grpo")
  seq-mean-token-sum       (1/s) Σ_b Σ_t ℓ m
  seq-mean-token-sum-norm  (1/s) Σ_b Σ_t ℓ m / λ          (Dr.GRPO, TRL "dr_grpo")

s defaults to B, all rows, fully masked ones included, as torch.mean does in verl and TRL. λ
defaults to N, the padded completion length. verl's seq-mean-token-sum-norm divides the batch total
by λ alone, with no 1/s, so its scale grows with the micro-batch size. We keep the 1/s that the
Dr.GRPO paper and TRL's "dr_grpo" have. Under a fixed batch size this only rescales the learning
rate.

For gradient accumulation, a trainer that wants the mean over the whole mini-batch passes the
mini-batch totals as `token_count` (for n) and `seq_count` (for s). Each micro-batch's result then
sums to the full-batch value.

A fully masked row contributes 0, and an all-masked batch gives 0, never NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

from metaphorstar_jax.rl.config import LOSS_AGG_MODES


def aggregate(values_BN, mask_BN, mode: str, *, norm_length: int | None = None,
              token_count=None, seq_count=None):
  """Masked reduction of `values_BN` [B, N] to a scalar.

  Args:
    values_BN: per-token values, e.g. the clipped policy loss.
    mask_BN: 1/True on tokens that count; anything else is ignored, NaN included.
    mode: one of `LOSS_AGG_MODES`.
    norm_length: λ of "seq-mean-token-sum-norm"; None for N. Ignored by the other modes.
    token_count: n to divide by in "token-mean" instead of this batch's Σ mask.
    seq_count: s to divide by in the seq-mean modes instead of B.

  Returns:
    A float32 scalar.
  """
  if mode not in LOSS_AGG_MODES:
    raise ValueError(f"loss_agg_mode={mode!r} is not one of {list(LOSS_AGG_MODES)}.")
  if values_BN.ndim != 2 or values_BN.shape != mask_BN.shape:
    raise ValueError(f"aggregate needs values and mask of the same [B, N] shape; got "
                     f"{values_BN.shape} and {mask_BN.shape}.")
  valid_BN = mask_BN.astype(bool)
  # Masked entries are replaced, not multiplied, so a NaN there cannot leak into sums or gradients.
  masked_BN = jnp.where(valid_BN, values_BN.astype(jnp.float32), 0.0)
  num_rows, num_tokens = values_BN.shape

  if mode == "token-mean":
    count = jnp.sum(valid_BN) if token_count is None else token_count
    return jnp.sum(masked_BN) / jnp.maximum(count, 1)

  seqs = num_rows if seq_count is None else seq_count
  seqs = jnp.maximum(seqs, 1)
  row_sums_B = jnp.sum(masked_BN, axis=-1)
  if mode == "seq-mean-token-mean":
    row_lengths_B = jnp.sum(valid_BN, axis=-1)
    return jnp.sum(row_sums_B / jnp.maximum(row_lengths_B, 1)) / seqs
  if mode == "seq-mean-token-sum":
    return jnp.sum(row_sums_B) / seqs
  length = num_tokens if norm_length is None else norm_length
  return jnp.sum(row_sums_B) / (seqs * length)


def masked_mean(values_BN, mask_BN):
  """Σ values·mask / Σ mask over every axis, 0 when nothing is valid; for metrics."""
  valid = mask_BN.astype(bool)
  total = jnp.sum(jnp.where(valid, values_BN.astype(jnp.float32), 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)
