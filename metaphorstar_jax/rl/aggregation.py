"""Reducing a per-token loss to a scalar, under verl's `loss_agg_mode` names.

Shape letters: B rows (completions), T completion tokens.

With ℓ the per-token loss, m the 0/1 mask, n_b = Σ_t m_bt the valid tokens of row b, N = Σ_b n_b,
S the number of sequences and L the normalisation length:

  token-mean               Σ_bt ℓ m / N                  (DAPO, EasyR1 "token", TRL "dapo"/"bnpo")
  seq-mean-token-mean      (1/S) Σ_b (Σ_t ℓ m / n_b)      (original GRPO, TRL "grpo")
  seq-mean-token-sum       (1/S) Σ_b Σ_t ℓ m
  seq-mean-token-sum-norm  (1/S) Σ_b Σ_t ℓ m / L          (Dr.GRPO, TRL "dr_grpo")

S defaults to B, all rows, fully masked ones included, as torch.mean does in verl and TRL. L
defaults to T, the padded completion length. verl's seq-mean-token-sum-norm divides the batch total
by L alone, with no 1/S, so its scale grows with the micro-batch size. We keep the 1/S that the
Dr.GRPO paper and TRL's "dr_grpo" have. Under a fixed batch size this only rescales the learning
rate.

For gradient accumulation, a trainer that wants the mean over the whole mini-batch passes the
mini-batch totals as `token_count` (for N) and `seq_count` (for S). Each micro-batch's result then
sums to the full-batch value.

A fully masked row contributes 0, and an all-masked batch gives 0, never NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

from metaphorstar_jax.rl.config import LOSS_AGG_MODES


def aggregate(values_BT, mask_BT, mode: str, *, norm_length: int | None = None,
              token_count=None, seq_count=None):
  """Masked reduction of `values_BT` [B, T] to a scalar.

  Args:
    values_BT: per-token values, e.g. the clipped policy loss.
    mask_BT: 1/True on tokens that count; anything else is ignored, NaN included.
    mode: one of `LOSS_AGG_MODES`.
    norm_length: L of "seq-mean-token-sum-norm"; None for T. Ignored by the other modes.
    token_count: N to divide by in "token-mean" instead of this batch's Σ mask.
    seq_count: S to divide by in the seq-mean modes instead of B.

  Returns:
    A float32 scalar.
  """
  if mode not in LOSS_AGG_MODES:
    raise ValueError(f"loss_agg_mode={mode!r} is not one of {list(LOSS_AGG_MODES)}.")
  if values_BT.ndim != 2 or values_BT.shape != mask_BT.shape:
    raise ValueError(f"aggregate needs values and mask of the same [B, T] shape; got "
                     f"{values_BT.shape} and {mask_BT.shape}.")
  valid_BT = mask_BT.astype(bool)
  # Masked entries are replaced, not multiplied, so a NaN there cannot leak into sums or gradients.
  masked_BT = jnp.where(valid_BT, values_BT.astype(jnp.float32), 0.0)
  num_rows, num_tokens = values_BT.shape

  if mode == "token-mean":
    count = jnp.sum(valid_BT) if token_count is None else token_count
    return jnp.sum(masked_BT) / jnp.maximum(count, 1)

  seqs = num_rows if seq_count is None else seq_count
  seqs = jnp.maximum(seqs, 1)
  row_sums_B = jnp.sum(masked_BT, axis=-1)
  if mode == "seq-mean-token-mean":
    row_lengths_B = jnp.sum(valid_BT, axis=-1)
    return jnp.sum(row_sums_B / jnp.maximum(row_lengths_B, 1)) / seqs
  if mode == "seq-mean-token-sum":
    return jnp.sum(row_sums_B) / seqs
  length = num_tokens if norm_length is None else norm_length
  return jnp.sum(row_sums_B) / (seqs * length)


def masked_mean(values_BT, mask_BT):
  """Σ values·mask / Σ mask over every axis, 0 when nothing is valid; for metrics."""
  valid = mask_BT.astype(bool)
  total = jnp.sum(jnp.where(valid, values_BT.astype(jnp.float32), 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)
