"""Qwen2.5-VL for conditional generation: ViT features scattered into the decoder's embeddings.

Shape letters (README "Shape letters"): B rows, T tokens, S keys, D width, V vocabulary,
X patches, Y values per patch, I images, C merged cells (image features); P prefix rows,
A prefix keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaphorstar_jax.models.qwen2_5_vl import layers
from metaphorstar_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from metaphorstar_jax.models.qwen2_5_vl.positions import rope_index
from metaphorstar_jax.models.qwen2_5_vl.text import TextModel, init_cache
from metaphorstar_jax.models.qwen2_5_vl.vision import VisionTower


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def scatter_image_features(embeds_BTD, input_ids_BT, features_CD, image_token_id):
  """Replaces the embeddings at image-pad tokens by image features, in batch-row-major order."""
  is_image_BT = input_ids_BT == image_token_id
  feature_index_BT = jnp.cumsum(is_image_BT.reshape(-1)).reshape(is_image_BT.shape) - 1
  feature_index_BT = jnp.clip(feature_index_BT, 0, features_CD.shape[0] - 1)
  gathered_BTD = features_CD.astype(embeds_BTD.dtype)[feature_index_BT]
  return jnp.where(is_image_BT[..., None], gathered_BTD, embeds_BTD)


def check_image_tokens(input_ids_BT, image_grid_thw_I3, merge_size: int, image_token_id: int):
  """Raises when the prompt's image-pad count disagrees with the images' feature count."""
  if not (_is_concrete(input_ids_BT) and _is_concrete(image_grid_thw_I3)):
    return  # traced: shapes were fixed by the caller, nothing to check here
  grid = np.asarray(image_grid_thw_I3).reshape(-1, 3)
  expected = int((grid.prod(axis=1) // merge_size ** 2).sum())
  found = int((np.asarray(input_ids_BT) == image_token_id).sum())
  if found != expected:
    raise ValueError(
        f"The prompt holds {found} image-pad tokens (id {image_token_id}) but the "
        f"{grid.shape[0]} image(s) with grids {grid.tolist()} give {expected} features. Expand "
        "each image into t·h·w/merge² pad tokens with the processor, and do not truncate through "
        "an image.")


class Qwen2_5_VL(nnx.Module):
  """The model. Call it with token ids (and images) to get logits (B, T, V)."""

  def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=config.compute_dtype, param_dtype=config.weights_dtype, remat=config.remat,
              offload=config.remat_offload, rngs=rngs)
    self.visual = VisionTower(config.vision, **kw)
    self.language_model = TextModel(config.text, **kw)
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Linear(config.text.hidden_size, config.text.vocab_size, use_bias=False,
                                dtype=config.compute_dtype, param_dtype=config.weights_dtype,
                                rngs=rngs)

  def position_ids(self, input_ids_BT, attention_mask_BT=None, image_grid_thw_I3=None):
    """3-D M-RoPE ids (3, B, T) and rope deltas (B,), see `positions.rope_index`."""
    return rope_index(input_ids_BT, attention_mask_BT, image_grid_thw_I3,
                      image_token_id=self.config.image_token_id,
                      merge_size=self.config.vision.spatial_merge_size)

  def embed(self, input_ids_BT, pixel_values_XY=None, image_grid_thw_I3=None, vision_layout=None):
    """Token embeddings with image features in place of the image-pad tokens: (B, T, D)."""
    embeds_BTD = self.language_model.embed_tokens(input_ids_BT)
    if pixel_values_XY is None or pixel_values_XY.shape[0] == 0:
      return embeds_BTD
    check_image_tokens(input_ids_BT, image_grid_thw_I3, self.config.vision.spatial_merge_size,
                       self.config.image_token_id)
    features_CD = self.visual(pixel_values_XY, image_grid_thw_I3, layout=vision_layout)
    return scatter_image_features(embeds_BTD, input_ids_BT, features_CD,
                                  self.config.image_token_id)

  def hidden_states(self, input_ids_BT, attention_mask_BT=None, pixel_values_XY=None,
                    image_grid_thw_I3=None, position_ids_3BT=None, vision_layout=None):
    """Final-normed decoder states (B, T, D) for a full (non-cached) forward pass."""
    B, T = input_ids_BT.shape
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((B, T), jnp.int32)
    if position_ids_3BT is None:
      position_ids_3BT, _ = self.position_ids(input_ids_BT, attention_mask_BT, image_grid_thw_I3)
    x_BTD = self.embed(input_ids_BT, pixel_values_XY, image_grid_thw_I3, vision_layout)
    mask = layers.CausalMask(jnp.asarray(attention_mask_BT) > 0, 0)
    hidden_BTD, _ = self.language_model(x_BTD, position_ids_3BT, mask)
    return hidden_BTD

  def init_cache(self, batch: int, length: int, dtype=None):
    """An empty KV cache for `batch` rows of `length` tokens (compute dtype by default)."""
    return init_cache(self.config.text, batch, length, dtype or self.config.compute_dtype)

  def cached_hidden_states(self, x_BTD, position_ids_3BT, cache, cache_index, kv_valid_BS,
                           prefix=None):
    """Decoder states for embeddings written into `cache` at `cache_index` (prefill or decode).

    Args:
      x_BTD: embeddings of the new tokens (from `embed`).
      position_ids_3BT: their M-RoPE ids.
      cache: from `init_cache`; its length S bounds prompt plus completion.
      cache_index: slot of the first new token (a scalar, the same for every row).
      kv_valid_BS: True for cache slots holding real tokens (False for left padding).
      prefix: optional (prefix_cache, prefix_valid_PA): the filled cache of P earlier sequences
        (e.g. prompts), each shared by B / P adjacent rows and attended before `cache`, so a
        group of completions reads its prompt's keys once instead of from G tiled copies.

    Returns:
      Hidden states (B, T, D) and the updated cache.
    """
    mask = layers.CausalMask(kv_valid_BS, cache_index)
    return self.language_model(x_BTD, position_ids_3BT, mask, cache, cache_index, prefix)

  def prefill(self, input_ids_BT, attention_mask_BT, pixel_values_XY=None,
              image_grid_thw_I3=None, *, cache_dtype=None):
    """One pass over left-aligned prompts that fills their KV cache: what decoding continues from,
    the sampler's prefill and the trainer's prompt pass alike.

    Returns:
      hidden_BTD: decoder states; the last one predicts the first new token.
      cache: the prompts' filled KV cache, T slots (`init_cache`, in `cache_dtype`).
      valid_BT: True on real tokens (False on padding), the cache's valid slots.
      next_position_B: the M-RoPE position of each prompt's first new token.
    """
    B, T = input_ids_BT.shape
    position_ids_3BT, deltas_B = self.position_ids(input_ids_BT, attention_mask_BT,
                                                   image_grid_thw_I3)
    x_BTD = self.embed(input_ids_BT, pixel_values_XY, image_grid_thw_I3)
    valid_BT = attention_mask_BT > 0
    hidden_BTD, cache = self.cached_hidden_states(
        x_BTD, position_ids_3BT, self.init_cache(B, T, cache_dtype), 0, valid_BT)
    next_position_B = deltas_B + attention_mask_BT.sum(axis=1).astype(jnp.int32)
    return hidden_BTD, cache, valid_BT, next_position_B

  def prefill_and_continue(self, input_ids_PT, attention_mask_PT, pixel_values_XY,
                           image_grid_thw_I3, continuation_ids_BZ, continuation_valid_BZ):
    """The prompts' pass and a teacher-forced pass of their continuations, layer by layer in one
    scan (`TextModel.with_continuation`): what `prefill` then `cached_hidden_states` with the
    prompts' cache as prefix compute, with each layer's weight gradient summed inside the loop.

    Args:
      input_ids_PT, attention_mask_PT, pixel_values_XY, image_grid_thw_I3: left-aligned prompts.
      continuation_ids_BZ: tokens continuing the prompts, each run of B / P rows one prompt's.
      continuation_valid_BZ: True on real continuation tokens.

    Returns:
      The prompts' hidden states (P, T, D) and the continuations' (B, Z, D).
    """
    P = input_ids_PT.shape[0]
    B, Z = continuation_ids_BZ.shape
    position_ids_3PT, deltas_P = self.position_ids(input_ids_PT, attention_mask_PT,
                                                   image_grid_thw_I3)
    next_position_B = jnp.repeat(
        deltas_P + attention_mask_PT.sum(axis=1).astype(jnp.int32), B // P)
    positions_BZ = next_position_B[:, None] + jnp.arange(Z, dtype=jnp.int32)[None]
    return self.language_model.with_continuation(
        self.embed(input_ids_PT, pixel_values_XY, image_grid_thw_I3), position_ids_3PT,
        attention_mask_PT > 0, self.language_model.embed_tokens(continuation_ids_BZ),
        jnp.broadcast_to(positions_BZ[None], (3, B, Z)), continuation_valid_BZ)

  def logits(self, hidden_BTD):
    """LM head over hidden states: (..., V)."""
    if self.config.tie_word_embeddings:
      return self.language_model.embed_tokens.attend(hidden_BTD)
    return self.lm_head(hidden_BTD)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               position_ids=None, vision_layout=None):
    """Logits (B, T, V).

    Args:
      input_ids: (B, T) token ids, image pads already expanded by the processor.
      attention_mask: (B, T), 1 for real tokens; left or right padding.
      pixel_values: (X, Y) patches of all images in the batch, in order of appearance.
      image_grid_thw: (I, 3) one (t, h, w) per image.
      position_ids: optional (3, B, T) M-RoPE ids; computed from the inputs when absent.
      vision_layout: optional precomputed `positions.VisionLayout` for the images.
    """
    hidden_BTD = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                    position_ids, vision_layout)
    return self.logits(hidden_BTD)
