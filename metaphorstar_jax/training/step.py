"""The jitted pieces of a training step: gradients of the GRPO and SFT losses, log-probs without
gradients (old and reference policies), and the optimizer update.

Gradients are taken per micro-batch and summed on device; each micro-batch loss is normalised by
the whole mini-batch's token and row counts, so the sum equals the mini-batch loss exactly.
Parameters are arguments everywhere: nothing recompiles when they change.

Shape letters: P prompts, B rows (P·G), N completion tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from metaphorstar_jax import rl
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs


def _nonfinite_count(opt_state) -> jax.Array:
  """Total skipped updates recorded by optax.apply_if_finite."""
  return opt_state.total_notfinite


class TrainSteps:
  """Compiled step functions for one model graph, optimizer and loss configuration."""

  def __init__(self, graphdef, tx: optax.GradientTransformation, loss_config: rl.LossConfig, *,
               temperature: float, logit_chunk: int = 0):
    self.graphdef = graphdef
    self.tx = tx
    self.loss_config = loss_config
    self.temperature = temperature
    self.logit_chunk = logit_chunk
    self.grpo_grads = jax.jit(self._grpo_grads)
    self.sft_grads = jax.jit(self._sft_grads)
    self.logprobs = jax.jit(self._logprobs)
    self.apply = jax.jit(self._apply, donate_argnums=(0, 1))
    self.accumulate = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))

  def _score(self, params, seq: SequenceBatch, with_entropy: bool):
    model = nnx.merge(self.graphdef, params)
    return completion_logprobs(model, seq, temperature=self.temperature,
                               chunk_size=self.logit_chunk, with_entropy=with_entropy)

  def _logprobs(self, params, seq: SequenceBatch):
    """Log-probs of the completions (B, N) without gradients: old or reference policy."""
    return jax.lax.stop_gradient(self._score(params, seq, with_entropy=False)[0])

  def _grpo_grads(self, params, seq: SequenceBatch, advantages_B, old_logprobs_BN,
                  ref_logprobs_BN, sampler_logprobs_BN, loss_mask_BN, token_count, seq_count):
    """Gradient of the policy loss on one micro-batch, and its metrics."""

    def loss_fn(params):
      logprobs_BN, entropy_BN = self._score(params, seq, with_entropy=True)
      return rl.policy_loss(self.loss_config, logprobs_BN, old_logprobs_BN, advantages_B,
                            loss_mask_BN, ref_logprobs_BN, entropy_BN, sampler_logprobs_BN,
                            token_count=token_count, seq_count=seq_count)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def _sft_grads(self, params, seq: SequenceBatch, token_count):
    """Gradient of the summed target-token NLL / `token_count` (token-mean over the mini-batch)."""

    def loss_fn(params):
      logprobs_BN, _ = self._score(params, seq, with_entropy=False)
      mask_BN = seq.completion_mask_BN.astype(jnp.float32)
      loss = -(logprobs_BN * mask_BN).sum() / jnp.maximum(token_count, 1)
      return loss, {"sft_loss": loss, "num_tokens": mask_BN.sum()}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def _apply(self, params, opt_state, grads):
    """One optimizer update; a non-finite gradient leaves params and moments unchanged."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": grad_norm,
                               "skipped_updates": _nonfinite_count(opt_state)}


def init_optimizer_state(tx: optax.GradientTransformation, params) -> Any:
  """Optimizer state laid out like the (possibly sharded) parameters."""
  return jax.jit(tx.init)(params)
