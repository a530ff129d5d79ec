"""TrainSteps (training/step.py): the scored width, the SFT gradient, the update's grad norm and
the optimizer state's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from metaphorstar_jax import rl, sharding
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler, SamplingConfig
from metaphorstar_jax.training import step as step_lib
from metaphorstar_jax.training.policy import SequenceBatch, completion_logprobs
from helpers import assert_close_to_largest, make_steps, tiny_batch


def host_steps(**knobs):
  """TrainSteps for the host-side arithmetic only: nothing is traced, so no model is needed."""
  return step_lib.TrainSteps(None, optax.sgd(1.0), rl.LossConfig(), temperature=1.0, **knobs)


def mask_of(lengths, N):
  return (np.arange(N)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def test_scored_columns_round_the_longest_completion_up_to_a_bucket():
  steps = host_steps(completion_buckets=4)  # buckets of 16 / 4 = 4 columns
  assert steps.scored_columns(mask_of([1, 5, 2], 16)) == 8
  assert steps.scored_columns(mask_of([4, 4], 16)) == 4
  assert steps.scored_columns(mask_of([16, 0], 16)) == 16
  assert steps.scored_columns(np.zeros((2, 16), np.int32)) == 4  # nothing to score: one bucket
  # A bucket of 3 columns (10 / 4, rounded up) never passes the padded width.
  assert host_steps(completion_buckets=4).scored_columns(mask_of([8], 10)) == 9
  assert host_steps(completion_buckets=4).scored_columns(mask_of([10], 10)) == 10


def test_scored_columns_keep_chunked_logits_in_whole_chunks():
  steps = host_steps(completion_buckets=8, logit_chunk=3)  # granule 2, rounded up to 3
  assert steps.scored_columns(mask_of([1], 16)) == 3
  assert steps.scored_columns(mask_of([4], 16)) == 6
  assert steps.scored_columns(mask_of([16], 16)) == 16


def sft_inputs(model, lengths):
  batch = tiny_batch(model.config)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=5))
  rollouts = sampler(batch, group_size=len(lengths) // 2, key=jax.random.key(0))
  tokens = np.asarray(rollouts.tokens_BN)
  return SequenceBatch(*sampler.prepare(batch), tokens, mask_of(lengths, tokens.shape[1]))


def test_sft_gradient_is_the_gradient_of_the_mean_target_nll():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=11)
  seq = sft_inputs(model, [5, 2, 0, 3])
  steps, params, _ = make_steps(model)
  token_count = 7.0  # the mini-batch's count, not this micro-batch's 10

  def nll(params, seq):
    logprobs_BN, _ = completion_logprobs(nnx.merge(steps.graphdef, params), seq,
                                         with_entropy=False)
    return -(logprobs_BN * seq.completion_mask_BN).sum() / token_count

  # The batch is traced, as in TrainSteps: concrete, it would have the model count image tokens
  # against every image, the bucket's padding image included.
  want_loss, want_grads = jax.jit(jax.value_and_grad(nll))(params, seq)
  grads, metrics = steps.sft_grads(params, seq, token_count)
  np.testing.assert_allclose(float(metrics["sft_loss"]), float(want_loss), rtol=1e-5)
  assert float(metrics["num_tokens"]) == 10.0
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def toy_params():
  return {"head": {"kernel": jnp.asarray([1.0, 2.0])},
          "vision": {"kernel": jnp.asarray([1.0, 1.0, 1.0])}}


def test_grad_norm_leaves_out_frozen_parameters_and_the_update_skips_them():
  params = toy_params()
  labels = {"head": {"kernel": "trained"}, "vision": {"kernel": "frozen"}}
  tx = optax.multi_transform({"trained": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
  steps = step_lib.TrainSteps(None, optax.apply_if_finite(tx, 3), rl.LossConfig(),
                              temperature=1.0, frozen=("vision",))
  grads = {"head": {"kernel": jnp.asarray([3.0, 4.0])},
           "vision": {"kernel": jnp.asarray([100.0, 0.0, 0.0])}}
  opt_state = step_lib.init_optimizer_state(steps.tx, params)
  new, _, metrics = steps.apply(params, opt_state, grads)
  np.testing.assert_allclose(float(metrics["grad_norm"]), 5.0)
  assert int(metrics["skipped_updates"]) == 0
  np.testing.assert_allclose(np.asarray(new["head"]["kernel"]), [-2.0, -2.0])
  np.testing.assert_array_equal(np.asarray(new["vision"]["kernel"]), [1.0, 1.0, 1.0])


def test_optimizer_state_is_laid_out_like_the_parameters():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  rows = NamedSharding(mesh, PartitionSpec("fsdp"))
  params = {"kernel": jax.device_put(jnp.arange(8.0), rows),
            "bias": jax.device_put(jnp.ones(3), NamedSharding(mesh, PartitionSpec()))}
  opt_state = step_lib.init_optimizer_state(optax.adam(1e-3), params)
  adam = opt_state[0]
  assert adam.mu["kernel"].sharding == rows and adam.nu["kernel"].sharding == rows
  assert adam.mu["bias"].sharding == params["bias"].sharding
  # The step count has no parameter's shape: replicated over the parameters' mesh.
  assert adam.count.sharding.mesh == mesh and adam.count.sharding.spec == PartitionSpec()


def test_activations_split_by_rows_only_under_the_traced_mesh():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))

  def doubled(x):
    with sharding.activations_on(mesh):
      return sharding.constrain_rows(x * 2)

  on_mesh = lambda shape: jax.device_put(jnp.ones(shape), NamedSharding(mesh, PartitionSpec()))
  out = jax.jit(doubled)(on_mesh((8, 3)))  # replicated in, rows split out
  assert out.sharding.is_equivalent_to(rows, 2)
  uneven = jax.jit(doubled)(on_mesh((6, 3)))  # 6 rows do not split over 8 devices
  assert uneven.sharding.is_fully_replicated
  assert sharding.constrain_rows(jnp.ones((8, 3))).sharding.is_fully_replicated  # no mesh: as is


def test_a_scanned_layers_parameters_stay_split_like_their_stack():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  layer = {"self_attn": {"q_proj": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)},
                         "o_proj": {"kernel": jnp.ones((8, 16))}},
           "input_layernorm": {"scale": jnp.ones(16)}}

  def constrained_specs(layer):
    with sharding.activations_on(mesh):
      jaxpr = jax.make_jaxpr(sharding.constrain_layer)(layer)
    return [e.params["sharding"].spec for e in jaxpr.jaxpr.eqns
            if e.primitive.name == "sharding_constraint"]

  # Each as its (L, ...) stack's rule without the layer axis, in the tree's (sorted) leaf order:
  # input_layernorm, o_proj (tensor, fsdp), q_proj bias (tensor), q_proj kernel (fsdp, tensor).
  assert constrained_specs(layer) == [PartitionSpec(None), PartitionSpec(None, "fsdp"),
                                      PartitionSpec(None), PartitionSpec("fsdp", None)]
  assert sharding.constrain_layer(layer) is layer  # no mesh traced: as is


def test_gradients_on_a_mesh_are_laid_out_like_the_parameters_and_equal_one_devices():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=11)
  seq = sft_inputs(model, [5, 2, 0, 3, 1, 4, 5, 2])
  steps, params, _ = make_steps(model)
  want, _ = steps.sft_grads(params, seq, 7.0)
  placement = sharding.parameter_shardings(params, mesh)
  on_mesh = step_lib.TrainSteps(steps.graphdef, steps.tx, steps.loss_config, temperature=1.0,
                                mesh=mesh)
  place = lambda a: sharding.place_rows(a, mesh)
  seq = seq._replace(prompt_ids_PT=place(seq.prompt_ids_PT),
                     prompt_mask_PT=place(seq.prompt_mask_PT),
                     completion_BN=place(seq.completion_BN),
                     completion_mask_BN=place(seq.completion_mask_BN))
  grads, _ = on_mesh.sft_grads(jax.device_put(params, placement), seq, 7.0)
  # Unpinned, XLA returned the gradients replicated once the activations were split by rows.
  assert jax.tree.leaves(jax.tree.map(lambda g: g.sharding, grads)) == jax.tree.leaves(placement)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    assert_close_to_largest(a, b)  # the mesh sums rows in another order
