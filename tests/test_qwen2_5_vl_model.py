"""Model behaviour beyond parity: jit with traced grids, rematerialisation, gradients, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_close_to_largest, tiny_batch
from metaphorstar_jax.models import qwen2_5_vl


def loss_fn(model, batch):
  logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  logprobs = jax.nn.log_softmax(logits[:, :-1])
  picked = jnp.take_along_axis(logprobs, batch["input_ids"][:, 1:, None], -1)[..., 0]
  return -(picked * batch["attention_mask"][:, 1:]).sum()


def remat_in_scans(model, batch):
  """The lengths of the gradient's scans whose body is a layer under one remat (the backward
  scans of a remat model); raises on a remat anywhere else but inside the ViT's scans."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda state: loss_fn(nnx.merge(graphdef, state), batch)))(state)
  lengths, scans = [], [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  for eqn in scans:
    body = [e.primitive.name for e in eqn.params["jaxpr"].jaxpr.eqns]
    remats = sum(name.startswith("remat") for name in body)  # remat2 in jax 0.10
    assert remats <= 1, f"a scan body with {remats} remats"
    lengths += [eqn.params["length"]] * remats
  outside = [e for e in jaxpr.jaxpr.eqns if e.primitive.name != "scan"]
  assert "remat" not in " ".join(map(str, outside)), "remat outside the layer scans"
  return sorted(lengths)


def test_jit_with_traced_grids_matches_eager():
  model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=1)
  batch = tiny_batch(model.config)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    return nnx.merge(graphdef, state)(**batch)

  np.testing.assert_allclose(np.asarray(forward(state, batch)), np.asarray(model(**batch)),
                             atol=1e-5)


def test_remat_gives_identical_loss_and_gradients():
  cfg = qwen2_5_vl.preset("tiny")
  plain = qwen2_5_vl.init(cfg, seed=2)
  remat = qwen2_5_vl.init(cfg.replace(remat=True), seed=2)
  batch = tiny_batch(cfg, seed=1)
  loss_a, grads_a = nnx.value_and_grad(loss_fn)(plain, batch)
  loss_b, grads_b = nnx.value_and_grad(loss_fn)(remat, batch)
  assert np.isfinite(float(loss_a))
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  leaves_a, leaves_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for a, b in zip(leaves_a, leaves_b):
    assert_close_to_largest(b, a)  # the recomputed scan body sums in another order
  # The decoder layers and the ViT blocks each run as one scan whose backward body recomputes
  # its layer under one remat; nothing is rematerialised without remat.
  assert remat_in_scans(remat, batch) == sorted([cfg.text.num_hidden_layers, cfg.vision.depth])
  assert remat_in_scans(plain, batch) == []
  # The vision tower receives gradient through the scattered features.
  patch_grad = grads_a["visual"]["patch_embed"]["kernel"]
  assert float(jnp.abs(patch_grad[...]).max()) > 0


def scan_lengths(jaxpr) -> list[int]:
  """The lengths of every scan in `jaxpr`, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += scan_lengths(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += scan_lengths(sub)
  return found


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_decoder_mlp_in_pieces_gives_the_same_loss_and_gradients(monkeypatch, remat):
  """A long sequence's MLP runs over its tokens in pieces (layers.in_pieces): the same values
  and gradients, the last piece padded (27 tokens in 4 pieces of 8)."""
  from metaphorstar_jax.models.qwen2_5_vl import layers
  cfg = qwen2_5_vl.preset("tiny").replace(remat=remat)
  model = qwen2_5_vl.init(cfg, seed=2)
  batch = tiny_batch(cfg, seed=1)
  loss_whole, grads_whole = nnx.value_and_grad(loss_fn)(model, batch)
  graphdef, state = nnx.split(model)
  grad_jaxpr = lambda: jax.make_jaxpr(jax.grad(
      lambda state: loss_fn(nnx.merge(graphdef, state), batch)))(state).jaxpr
  assert 4 not in scan_lengths(grad_jaxpr())
  monkeypatch.setattr(layers, "MLP_PIECE", 8)
  assert batch["input_ids"].shape[1] == 27 and scan_lengths(grad_jaxpr()).count(4) >= 2
  loss_pieces, grads_pieces = nnx.value_and_grad(loss_fn)(model, batch)
  np.testing.assert_allclose(float(loss_pieces), float(loss_whole), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_whole), jax.tree.leaves(grads_pieces)):
    assert_close_to_largest(b, a)  # weight gradients summed piece by piece


def test_offloaded_remat_keeps_layer_inputs_in_host_memory_and_the_same_gradients():
  cfg = qwen2_5_vl.preset("tiny", remat=True)
  batch = tiny_batch(cfg)
  on_device = qwen2_5_vl.init(cfg, seed=2)
  offloaded = qwen2_5_vl.init(dataclasses.replace(cfg, remat_offload=True), seed=2)

  def forward_residuals(model):
    """(shape, memory space) of what the forward layer scans keep for the backward pass."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch)))(state)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    first_backward = next(i for i, e in enumerate(scans)  # backward scans run in reverse
                          if e.params["reverse"])
    return sorted((tuple(v.aval.shape), str(v.aval.memory_space).split(".")[-1])
                  for e in scans[:first_backward] for v in e.outvars[e.params["num_carry"]:])

  # The layer inputs the recomputation starts from: the ViT's patches and the decoder's rows,
  # one per block / layer.
  X = int(np.prod(batch["image_grid_thw"], axis=1).sum())
  B, T = batch["input_ids"].shape
  saved = [((cfg.text.num_hidden_layers, B, T, cfg.text.hidden_size)),
           ((cfg.vision.depth, X, cfg.vision.hidden_size))]
  assert forward_residuals(on_device) == sorted((shape, "Device") for shape in saved)
  assert forward_residuals(offloaded) == sorted((shape, "Host") for shape in saved)
  grad = lambda model: jax.grad(loss_fn)(model, batch)
  for a, b in zip(jax.tree.leaves(grad(on_device)), jax.tree.leaves(grad(offloaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_remat_offload_needs_remat():
  with pytest.raises(ValueError, match="remat_offload.*remat=True"):
    qwen2_5_vl.preset("tiny", remat_offload=True)


def test_bf16_compute_with_fp32_master_weights():
  cfg = qwen2_5_vl.preset("tiny", dtype="bfloat16", param_dtype="float32")
  model = qwen2_5_vl.init(cfg, seed=3)
  batch = tiny_batch(cfg, seed=2)
  assert model.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
  logits = model(**batch)
  assert logits.dtype == jnp.bfloat16
  reference = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=3)(**batch)
  valid = batch["attention_mask"].astype(bool)
  error = np.abs(np.asarray(logits, np.float32) - np.asarray(reference))[valid].max()
  assert error < 0.1 * np.abs(np.asarray(reference))[valid].max()


def test_attention_after_a_shared_prefix_equals_attention_over_the_tiled_prefix():
  from metaphorstar_jax.models.qwen2_5_vl import layers
  P, G, T, S, A, Q, K, H = 3, 4, 2, 5, 6, 4, 2, 8
  B = P * G
  keys = jax.random.split(jax.random.key(0), 5)
  q_BTQH = jax.random.normal(keys[0], (B, T, Q, H))
  k_BKSH, v_BKSH = (jax.random.normal(k, (B, K, S, H)) for k in keys[1:3])
  prefix_k_PKAH, prefix_v_PKAH = (jax.random.normal(k, (P, K, A, H)) for k in keys[3:5])
  prefix_mask_PA = np.ones((P, A), bool)
  prefix_mask_PA[0, :4] = False                     # left padding
  prefix_mask_PA[2] = False                         # a prompt with no visible key
  mask_BTS = np.tril(np.ones((T, S), bool), k=1)[None].repeat(B, 0)
  mask_BTS[G * 2:] = False                          # ...and rows with none of their own
  got = layers.attend_after_prefix(q_BTQH, k_BKSH, v_BKSH, jnp.asarray(mask_BTS), prefix_k_PKAH,
                                   prefix_v_PKAH, jnp.asarray(prefix_mask_PA))
  tile = lambda a: jnp.repeat(a, G, axis=0)
  want = layers.attend(q_BTQH, jnp.concatenate([tile(prefix_k_PKAH), k_BKSH], axis=2),
                       jnp.concatenate([tile(prefix_v_PKAH), v_BKSH], axis=2),
                       jnp.concatenate([tile(jnp.asarray(prefix_mask_PA))[:, None].repeat(T, 1),
                                        jnp.asarray(mask_BTS)], axis=2))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert not np.asarray(got[G * 2:]).any()          # nothing visible: zeros, not NaN
