"""The jitted pieces of a training step: gradients of the GRPO and SFT losses, log-probs without
gradients (old and reference policies), and the optimizer update.

Gradients are taken per micro-batch and summed on device; each micro-batch loss is normalised by
the whole mini-batch's token and row counts, so the sum equals the mini-batch loss exactly.
Parameters are arguments everywhere: nothing recompiles when they change.

Shape letters (README "Shape letters"): P prompts, G group size, B rows (P·G), N completion
tokens (inside `_score`, N is the scored batch's width: the first `columns` of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaphorstar_jax import rl
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.training import optimizer
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs


def _nonfinite_count(opt_state) -> jax.Array:
  """Total skipped updates recorded by optax.apply_if_finite."""
  return opt_state.total_notfinite


class TrainSteps:
  """Compiled step functions for one model graph, optimizer and loss configuration.

  Completions are scored only up to the longest one in the batch, rounded up to a multiple of
  1/`completion_buckets` of the padded length N (and of `logit_chunk`), so at most that many
  widths compile; log-probs come back N wide, zero past the scored columns.
  """

  def __init__(self, graphdef, tx: optax.GradientTransformation, loss_config: rl.LossConfig, *,
               temperature: float, logit_chunk: int = 0, completion_buckets: int = 8,
               frozen: tuple[str, ...] = (), mesh: Mesh | None = None,
               compiler_options: Mapping[str, dict | None] | None = None):
    """`frozen`: regexes of the parameter paths the optimizer freezes (optimizer.make_optimizer);
    the reported grad_norm leaves them out, as the clipping does. `mesh`: the run's mesh, on which
    the forward pass lays out its activations (`sharding.constrain_rows`). `compiler_options`:
    XLA options by program name ('logprobs', 'grpo_grads', 'sft_grads', 'accumulate', 'apply'),
    e.g. each one's memory budget (training/memory_budget.py)."""
    self.graphdef = graphdef
    self.mesh = mesh
    self.frozen = tuple(frozen)
    self.tx = tx
    self.loss_config = loss_config
    self.temperature = temperature
    self.logit_chunk = logit_chunk
    self.completion_buckets = completion_buckets
    self.compiler_options = dict(compiler_options or {})
    options = self.compiler_options.get
    self._compiled_grads = None  # built on the first gradient, pinned to the params' shardings
    self._compiled_logprobs = jax.jit(self._logprobs, static_argnames=("columns",),
                                      compiler_options=options("logprobs"))
    self._compiled_apply = None  # built on the first `apply`, pinned to its inputs' shardings
    self.accumulate = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,),
                              compiler_options=options("accumulate"))

  # --- host side: pick the scored width, call the compiled functions -------------------------

  def scored_columns(self, completion_mask_BN) -> int:
    """How many leading completion columns to score: the bucket holding the longest completion."""
    N = completion_mask_BN.shape[1]
    if isinstance(completion_mask_BN, jax.Array) and not completion_mask_BN.is_fully_addressable:
      return N  # hosts would have to agree on the width; score everything
    used_N = np.asarray(completion_mask_BN).any(axis=0)
    longest = int(used_N.nonzero()[0].max()) + 1 if used_N.any() else 1
    granule = -(-N // self.completion_buckets)
    if self.logit_chunk > 0:  # keep chunked logits chunked
      granule = -(-granule // self.logit_chunk) * self.logit_chunk
    return min(N, -(-longest // granule) * granule)

  def grpo_grads(self, params, seq: SequenceBatch, advantages_B, old_logprobs_BN,
                 ref_logprobs_BN, sampler_logprobs_BN, loss_mask_BN, token_count, seq_count):
    """Gradient of the policy loss on one micro-batch (a pytree like params), and its metrics."""
    return self._gradient_programs(params)["grpo_grads"](
        params, seq, advantages_B, old_logprobs_BN, ref_logprobs_BN, sampler_logprobs_BN,
        loss_mask_BN, token_count, seq_count,
        columns=self.scored_columns(seq.completion_mask_BN))

  def sft_grads(self, params, seq: SequenceBatch, token_count):
    """Gradient of the summed target-token NLL / `token_count`, and its metrics."""
    return self._gradient_programs(params)["sft_grads"](params, seq, token_count,
                                    columns=self.scored_columns(seq.completion_mask_BN))

  def logprobs(self, params, seq: SequenceBatch):
    """Log-probs of the completions (B, N) without gradients: old or reference policy."""
    return self._compiled_logprobs(params, seq,
                                   columns=self.scored_columns(seq.completion_mask_BN))

  def compiled_update_programs(self) -> int:
    """How many programs the gradient, log-prob and update functions have compiled so far."""
    compiled = [*(self._compiled_grads or {}).values(), self._compiled_logprobs,
                self._compiled_apply]
    return sum(f._cache_size() for f in compiled if f is not None)

  # --- traced ---------------------------------------------------------------------------------

  def _score(self, params, seq: SequenceBatch, columns: int, *, with_entropy: bool):
    model = nnx.merge(self.graphdef, params)
    width = seq.completion_BN.shape[1]
    scored = seq._replace(completion_BN=seq.completion_BN[:, :columns],
                          completion_mask_BN=seq.completion_mask_BN[:, :columns])
    with sharding_lib.activations_on(self.mesh):
      logprobs_BN, entropy_BN = completion_logprobs(
          model, scored, temperature=self.temperature, chunk_size=self.logit_chunk,
          with_entropy=with_entropy)
    widen = lambda a_BN: jnp.pad(a_BN, ((0, 0), (0, width - columns)))
    return widen(logprobs_BN), widen(entropy_BN)

  def _logprobs(self, params, seq: SequenceBatch, columns: int):
    return jax.lax.stop_gradient(self._score(params, seq, columns, with_entropy=False)[0])

  def _grpo_grads(self, params, seq: SequenceBatch, advantages_B, old_logprobs_BN,
                  ref_logprobs_BN, sampler_logprobs_BN, loss_mask_BN, token_count, seq_count,
                  columns: int):

    def loss_fn(params):
      logprobs_BN, entropy_BN = self._score(params, seq, columns, with_entropy=True)
      if self.loss_config.entropy_coeff == 0:  # only a metric then
        entropy_BN = jax.lax.stop_gradient(entropy_BN)
      return rl.policy_loss(self.loss_config, logprobs_BN, old_logprobs_BN, advantages_B,
                            loss_mask_BN, ref_logprobs_BN, entropy_BN, sampler_logprobs_BN,
                            token_count=token_count, seq_count=seq_count)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def _sft_grads(self, params, seq: SequenceBatch, token_count, columns: int):
    # Token-mean over the mini-batch when token_count is its total.

    def loss_fn(params):
      logprobs_BN, _ = self._score(params, seq, columns, with_entropy=False)
      mask_BN = seq.completion_mask_BN.astype(jnp.float32)
      loss = -(logprobs_BN * mask_BN).sum() / jnp.maximum(token_count, 1)
      return loss, {"sft_loss": loss, "num_tokens": mask_BN.sum()}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def apply(self, params, opt_state, grads):
    """One optimizer update (params and opt_state are donated): (params, opt_state, metrics).

    The outputs keep the inputs' shardings. Left to itself XLA may return an equivalent sharding
    spelled differently (PartitionSpec() for PartitionSpec(None,)), or shard a replicated bias,
    and every function that takes the new params would then compile again on the next step.
    """
    return self.programs(params, opt_state)["apply"](params, opt_state, grads)

  def programs(self, params, opt_state) -> dict[str, Any]:
    """The jitted functions of a step by name, for ahead-of-time lowering (metaphorstar_jax.plan);
    `params` and `opt_state` (arrays or ShapeDtypeStructs with shardings) pin the layout of the
    update's outputs."""
    if self._compiled_apply is None:
      self._compiled_apply = jax.jit(
          self._apply, donate_argnums=(0, 1),
          out_shardings=(jax.tree.map(lambda x: x.sharding, params),
                         optimizer_state_shardings(opt_state, params), None),
          compiler_options=self.compiler_options.get("apply"))
    return {**self._gradient_programs(params), "logprobs": self._compiled_logprobs, "accumulate": self.accumulate,
            "apply": self._compiled_apply}

  def _gradient_programs(self, params) -> dict[str, Any]:
    """The GRPO and SFT gradient functions, returning gradients laid out like `params`. Left to
    itself XLA returned them replicated (4x the bytes on a 4-chip slice) once the activations are
    split by rows."""
    if self._compiled_grads is None:
      static = dict(static_argnames=("columns",),
                    out_shardings=(jax.tree.map(lambda x: x.sharding, params), None))
      self._compiled_grads = {
          name: jax.jit(fn, **static, compiler_options=self.compiler_options.get(name))
          for name, fn in (("grpo_grads", self._grpo_grads), ("sft_grads", self._sft_grads))}
    return self._compiled_grads

  def _apply(self, params, opt_state, grads):
    """One optimizer update; a non-finite gradient leaves params and moments unchanged."""
    trained = grads
    if self.frozen:
      labels = optimizer.frozen_labels(grads, self.frozen)
      trained = jax.tree.map(lambda g, label: g if label == "trained" else jnp.zeros_like(g),
                             grads, labels)
    grad_norm = optax.tree.norm(trained)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": grad_norm,
                               "skipped_updates": _nonfinite_count(opt_state)}


def optimizer_state_shardings(opt_state, params):
  """Shardings for an optimizer state (arrays or ShapeDtypeStructs) laid out like `params`.

  A leaf whose key path ends in a parameter's path and has its shape (a moment of that
  parameter) takes the parameter's sharding; anything else (step counts, flags) is replicated on
  the parameters' devices.
  """
  by_path = {tuple(path): (x.shape, x.sharding)
             for path, x in jax.tree_util.tree_leaves_with_path(params)}
  depths = sorted({len(path) for path in by_path}, reverse=True)
  some = next(iter(by_path.values()))[1]
  replicated = (NamedSharding(some.mesh, PartitionSpec()) if isinstance(some, NamedSharding)
                else some)

  def pick(path, x):
    for depth in depths:
      shape, sharding = by_path.get(tuple(path[-depth:]), (None, None))
      if shape == x.shape:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def abstract_optimizer_state(tx: optax.GradientTransformation, params) -> Any:
  """The optimizer state of `params` (arrays or ShapeDtypeStructs with shardings) as
  ShapeDtypeStructs laid out as `init_optimizer_state` lays it out; nothing is allocated."""
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      optimizer_state_shardings(abstract, params))


def init_optimizer_state(tx: optax.GradientTransformation, params) -> Any:
  """Optimizer state laid out like the (possibly sharded) parameters.

  Moments do not depend on the parameters' values, so jit alone would leave them on one device.
  """
  abstract = jax.eval_shape(tx.init, params)
  return jax.jit(tx.init, out_shardings=optimizer_state_shardings(abstract, params))(params)
