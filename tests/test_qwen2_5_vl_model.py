"""Model behaviour beyond parity: jit with traced grids, rematerialisation, gradients, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hf_reference import random_pixels
from metaphorstar_jax.models import qwen2_5_vl


def tiny_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  grids = np.asarray([[1, 4, 8], [1, 6, 4]], np.int32)
  pad, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
  text = lambda n: rng.integers(0, 1990, n).tolist()
  row0 = text(3) + [start] + [pad] * 8 + [end] + text(4) + [start] + [pad] * 6 + [end] + text(2)
  row1 = text(12)
  T = len(row0)
  ids = np.zeros((2, T), np.int32)
  mask = np.zeros((2, T), np.int32)
  ids[0], mask[0] = row0, 1
  ids[1, T - len(row1):], mask[1, T - len(row1):] = row1, 1
  return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(rng, grids),
              image_grid_thw=grids)


def loss_fn(model, batch):
  logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  logprobs = jax.nn.log_softmax(logits[:, :-1])
  picked = jnp.take_along_axis(logprobs, batch["input_ids"][:, 1:, None], -1)[..., 0]
  return -(picked * batch["attention_mask"][:, 1:]).sum()


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
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The vision tower receives gradient through the scattered features.
  patch_grad = grads_a["visual"]["patch_embed"]["kernel"]
  assert float(jnp.abs(patch_grad[...]).max()) > 0


def test_bf16_compute_with_fp32_master_weights():
  cfg = qwen2_5_vl.preset("tiny", dtype="bfloat16", param_dtype="float32")
  model = qwen2_5_vl.init(cfg, seed=3)
  batch = tiny_batch(cfg, seed=2)
  assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
  logits = model(**batch)
  assert logits.dtype == jnp.bfloat16
  reference = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=3)(**batch)
  valid = batch["attention_mask"].astype(bool)
  error = np.abs(np.asarray(logits, np.float32) - np.asarray(reference))[valid].max()
  assert error < 0.1 * np.abs(np.asarray(reference))[valid].max()
