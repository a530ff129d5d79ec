"""Teacher-forced log-probabilities of completions under the policy, with images encoded once.

A group's G completions share one prompt: its images go through the ViT once, the decoder runs
over it once, and the G completions read its KV cache without copies, exactly as the sampler
does, so the trainer never pays G encodes, G prompt passes or G prompt caches.

Shape letters (README "Shape letters"): P prompts, G group size, B rows (P·G), T prompt tokens,
N completion tokens, Z = N - 1 completion tokens fed to the decoder, D width, V vocabulary,
X patches, Y values per patch, I images; chunked logits: J chunks of W tokens each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metaphorstar_jax import rl


class SequenceBatch(NamedTuple):
  """Prompts (left-aligned, P rows) and the completions to score (B = P·G rows)."""

  prompt_ids_PT: jax.Array
  prompt_mask_PT: jax.Array
  pixel_values_XY: jax.Array | None
  image_grid_thw_I3: jax.Array | None
  completion_BN: jax.Array
  completion_mask_BN: jax.Array


def completion_hidden_states(model, batch: SequenceBatch):
  """Decoder states (B, N, D) that predict each completion token (one step to its left).

  The decoder runs once over the P prompts, their keys at each layer shared by each group of G
  completions (as the sampler's prefill cache is); the B completions attend to [their prompt's
  keys ; their own causal keys] (`model.prefill_and_continue`: both passes in one layer scan).
  Equal to one full pass over the G-tiled prompt+completion rows, at 1/G of the prompt's cost,
  and differentiable through both passes.
  The last completion token is never fed: nothing reads its state.
  """
  P = batch.prompt_ids_PT.shape[0]
  B, N = batch.completion_BN.shape
  tile = lambda a: jnp.repeat(a, B // P, axis=0)
  fed = N - 1
  if fed == 0:
    prompt_hidden_PTD, *_ = model.prefill(batch.prompt_ids_PT, batch.prompt_mask_PT,
                                          batch.pixel_values_XY, batch.image_grid_thw_I3)
    return tile(prompt_hidden_PTD[:, -1:])
  # Completion positions continue from the prompt's, like the sampler's decode positions; they
  # attend to their prompt's keys, shared by the group as in the sampler (read once, never
  # tiled), then to their own causal keys.
  prompt_hidden_PTD, hidden_BZD = model.prefill_and_continue(
      batch.prompt_ids_PT, batch.prompt_mask_PT, batch.pixel_values_XY, batch.image_grid_thw_I3,
      batch.completion_BN[:, :fed], batch.completion_mask_BN[:, :fed] > 0)
  last_B1D = tile(prompt_hidden_PTD[:, -1:])  # prompts are left-aligned: T-1 is always real
  return jnp.concatenate([last_B1D, hidden_BZD], axis=1)


def completion_logprobs(model, batch: SequenceBatch, *, temperature: float = 1.0,
                        chunk_size: int = 0, with_entropy: bool = True):
  """log softmax(logits / temperature) of each completion token, and the per-token entropy.

  Args:
    chunk_size: when > 0 and below N, logits are formed `chunk_size` tokens at a time (N padded
      up to a multiple) and each chunk is recomputed in the backward pass, so neither the
      forward nor the gradient ever holds more than one chunk's (B, W, V) logits.

  Returns:
    logprobs_BN and entropy_BN (zeros when `with_entropy` is False), float32, unmasked.
  """
  hidden_BND = completion_hidden_states(model, batch)
  tokens_BN = batch.completion_BN

  def score(hidden_BWD, tokens_BW):  # W: one chunk's tokens, or all N when unchunked
    logits_BWV = model.logits(hidden_BWD)
    if with_entropy:
      return rl.token_logprobs_and_entropy(logits_BWV, tokens_BW, temperature=temperature)
    picked_BW = rl.token_logprobs(logits_BWV, tokens_BW, temperature=temperature)
    return picked_BW, jnp.zeros_like(picked_BW)

  B, N = tokens_BN.shape
  if chunk_size <= 0 or chunk_size >= N:
    return score(hidden_BND, tokens_BN)
  chunks = -(-N // chunk_size)
  pad = chunks * chunk_size - N  # padded positions score token 0 and are cut off below
  hidden_BND = jnp.pad(hidden_BND, ((0, 0), (0, pad), (0, 0)))
  tokens_BN = jnp.pad(tokens_BN, ((0, 0), (0, pad)))
  split = lambda a: jnp.moveaxis(a.reshape(B, chunks, chunk_size, *a.shape[2:]), 1, 0)
  picked_JBW, entropy_JBW = jax.lax.map(jax.checkpoint(lambda args: score(*args)),
                                        (split(hidden_BND), split(tokens_BN)))
  merge = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, chunks * chunk_size)[:, :N]
  return merge(picked_JBW), merge(entropy_JBW)
