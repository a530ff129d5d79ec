"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks, merger.

Shape letters (README "Shape letters"): X patches (rows of pixel_values), C merged cells (X / U),
U patches per cell (merge²), Y values per patch (channels·Tp·14·14 = 1176), D vision width,
E output width (the decoder's D), I images, Q heads, H head dim, F rotary frequencies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import layers, vision_attention
from metaphorstar_jax.models.qwen2_5_vl.config import VisionConfig
from metaphorstar_jax.models.qwen2_5_vl.positions import VisionLayout, vision_layout

# Queries per step of the full-attention blocks: bounds their logits to FRAME_CHUNK × X per head.
FRAME_CHUNK = 512


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.qkv = nnx.Linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
    self.proj = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

  def __call__(self, x_XD, cos_XH, sin_XH, segments_X, window_block: int):
    """Attention within segments: windows of at most `window_block` patches, or, when
    `window_block` is 0, whole frames (see vision_attention)."""
    X, D = x_XD.shape
    qkv = self.qkv(x_XD).reshape(X, 3, self.num_heads, D // self.num_heads)
    q_XQH, k_XQH, v_XQH = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # The vision rotary runs in fp32 and casts back, unlike the decoder's.
    rotate = lambda t: layers.apply_rotary(t.astype(jnp.float32), cos_XH[:, None],
                                           sin_XH[:, None]).astype(t.dtype)
    q_XQH, k_XQH = rotate(q_XQH), rotate(k_XQH)
    if window_block:
      out_XQH = vision_attention.window_attention(q_XQH, k_XQH, v_XQH, segments_X, window_block)
    else:
      out_XQH = vision_attention.frame_attention(q_XQH, k_XQH, v_XQH, segments_X, FRAME_CHUNK)
    return self.proj(out_XQH.reshape(X, D))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm1 = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                             use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_XD, cos_XH, sin_XH, segments_X, window_block: int):
    x_XD = x_XD + self.attn(self.norm1(x_XD), cos_XH, sin_XH, segments_X, window_block)
    return x_XD + self.mlp(self.norm2(x_XD))


class PatchMerger(nnx.Module):
  """RMSNorm, then each 2×2 block of patches concatenated and mapped by a GELU MLP to the LM width."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
    self.ln_q = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp_in = nnx.Linear(merged, merged, **kw)
    self.mlp_out = nnx.Linear(merged, cfg.out_hidden_size, **kw)

  def __call__(self, x_XD):
    x_CUD = self.ln_q(x_XD)
    x_C_UD = x_CUD.reshape(-1, self.mlp_in.in_features)
    return self.mlp_out(jax.nn.gelu(self.mlp_in(x_C_UD), approximate=False))


class VisionTower(nnx.Module):
  """pixel_values (X, Y) of any number of images → merged features (C, E) in raster order."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool = False,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    # Conv3d with stride == kernel is exactly a matmul over flattened (c, t, row, col) patches.
    self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, **kw)
    self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def layout(self, image_grid_thw_I3, num_patches: int) -> VisionLayout:
    cfg = self.cfg
    return vision_layout(image_grid_thw_I3, num_patches, merge_size=cfg.spatial_merge_size,
                         window_cells=cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)

  def __call__(self, pixel_values_XY, image_grid_thw_I3=None, *, layout: VisionLayout | None = None):
    """Encodes packed patches. Pass either the grids or a precomputed `layout`.

    Returns:
      features_CE in the images' raster order, concatenated over images.
    """
    cfg = self.cfg
    X = pixel_values_XY.shape[0]
    if layout is None:
      if image_grid_thw_I3 is None:
        raise ValueError("VisionTower needs image_grid_thw (or a precomputed layout).")
      layout = self.layout(image_grid_thw_I3, X)
    unit = cfg.spatial_merge_size ** 2
    x_XD = self.patch_embed(pixel_values_XY.astype(self.patch_embed.kernel[...].dtype))
    x_XD = x_XD.reshape(X // unit, unit, -1)[layout.window_index_C].reshape(X, -1)

    inv_freq = layers.inverse_frequencies(cfg.head_dim // 2, cfg.rope_theta)
    angles_XF = jnp.concatenate([layout.rope_rows_X[:, None] * inv_freq,
                                 layout.rope_cols_X[:, None] * inv_freq], axis=-1)
    emb_XH = jnp.concatenate([angles_XF, angles_XF], axis=-1)
    cos_XH, sin_XH = jnp.cos(emb_XH), jnp.sin(emb_XH)

    # A window is a contiguous run of at most window_cells² merged cells in window order.
    window_block = (cfg.window_size // cfg.patch_size) ** 2
    full_blocks = set(cfg.fullatt_block_indexes)
    for i, block in enumerate(self.blocks):
      x_XD = sharding_lib.constrain_rows(x_XD)  # patches split over the chips (see constrain_rows)
      segments_X, width = ((layout.frame_segments_X, 0) if i in full_blocks
                           else (layout.window_segments_X, window_block))
      if self.remat:  # the width picks the attention kind: a static argument
        x_XD = layers.call_rematerialised(block, x_XD, cos_XH, sin_XH, segments_X, width,
                                          static_argnums=(4,))
      else:
        x_XD = block(x_XD, cos_XH, sin_XH, segments_X, width)
    return self.merger(x_XD)[layout.reverse_index_C]
