"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks, merger.

Shape letters (README "Shape letters"): X patches (rows of pixel_values), C merged cells (X / U),
U patches per cell (merge²), Y values per patch (channels·Tp·14·14 = 1176), D vision width,
E output width (the decoder's D), I images, Q heads, H head dim, F rotary frequencies,
L blocks (stacked on a leading axis and scanned).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import layers, vision_attention
from metaphorstar_jax.models.qwen2_5_vl.config import VisionConfig
from metaphorstar_jax.models.qwen2_5_vl.positions import VisionLayout, vision_layout

# Queries per step of the full-attention blocks: bounds their logits to FRAME_CHUNK × X per head.
FRAME_CHUNK = 512


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.num_heads = cfg.num_heads
    # A window is a contiguous run of at most window_cells² merged cells in window order.
    self.window_block = (cfg.window_size // cfg.patch_size) ** 2
    self.qkv = nnx.Linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
    self.proj = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

  def __call__(self, x_XD, cos_XH, sin_XH, layout: VisionLayout, full):
    """Attention within segments: the layout's windows, or, where the traced flag `full` is set
    (the full-attention blocks), whole frames (see vision_attention)."""
    X, D = x_XD.shape
    qkv = self.qkv(x_XD).reshape(X, 3, self.num_heads, D // self.num_heads)
    q_XQH, k_XQH, v_XQH = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # The vision rotary runs in fp32 and casts back, unlike the decoder's.
    rotate = lambda t: layers.apply_rotary(t.astype(jnp.float32), cos_XH[:, None],
                                           sin_XH[:, None]).astype(t.dtype)
    q_XQH, k_XQH = rotate(q_XQH), rotate(k_XQH)
    # A flag per block rather than two kinds of block keeps one scanned body for the tower.
    # With remat each branch is rematerialised as well: a gradient of lax.cond keeps residuals
    # of both branches (zeros for the one not taken), which took the small ViT's gradient from
    # 1.3 to 3.5 GiB of temporaries at 65,536 patches; remat branches: 1.9 GiB.
    remat = jax.checkpoint if self.remat else lambda f: f
    frame = remat(lambda q, k, v: vision_attention.frame_attention(
        q, k, v, layout.frame_segments_X, FRAME_CHUNK))
    window = remat(lambda q, k, v: vision_attention.window_attention(
        q, k, v, layout.window_segments_X, self.window_block))
    out_XQH = jax.lax.cond(full, frame, window, q_XQH, k_XQH, v_XQH)
    return self.proj(out_XQH.reshape(X, D))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs):
    self.norm1 = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                             use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_XD, cos_XH, sin_XH, layout: VisionLayout, full):
    x_XD = x_XD + self.attn(self.norm1(x_XD), cos_XH, sin_XH, layout, full)
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
               offload: bool = False, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.offload = offload  # with remat: each block's saved input in host memory
    # Conv3d with stride == kernel is exactly a matmul over flattened (c, t, row, col) patches.
    self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, **kw)
    self.blocks = layers.stack(
        lambda rngs: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                 rngs=rngs),
        cfg.depth, rngs)
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

    full_L = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

    def step(block, x_XD, full):
      x_XD = sharding_lib.constrain_rows(x_XD)  # patches split over the chips (see constrain_rows)
      return block(x_XD, cos_XH, sin_XH, layout, full), None

    x_XD, _ = layers.scan(self.blocks, step, x_XD, jnp.asarray(full_L), remat=self.remat,
                          offload=self.offload)
    return self.merger(x_XD)[layout.reverse_index_C]
