"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v biases, RMSNorm, SwiGLU, M-RoPE.

Shape letters (README "Shape letters"): B rows, T tokens, S keys, D width, Q query heads,
K kv heads, H head dim, F = H / 2; for a shared prefix: P prefix rows, A prefix keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import layers
from metaphorstar_jax.models.qwen2_5_vl.config import TextConfig


def mrope_cos_sin(position_ids_3BT, cfg: TextConfig, dtype):
  """cos/sin (B, T, H) of M-RoPE: frequency slots split contiguously over the t, h, w axes.

  Computed in fp32, then cast to the activation dtype as transformers does.
  """
  inv_freq_F = layers.inverse_frequencies(cfg.head_dim, cfg.rope_theta)
  angles_3BTF = position_ids_3BT.astype(jnp.float32)[..., None] * inv_freq_F
  bounds = [0]
  for size in cfg.mrope_section:
    bounds.append(bounds[-1] + size)
  angles_BTF = jnp.concatenate(
      [angles_3BTF[axis, ..., lo:hi] for axis, (lo, hi) in enumerate(zip(bounds, bounds[1:]))],
      axis=-1)
  emb_BTH = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)
  return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    H = cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, H)
    self.q_proj = nnx.Linear(cfg.hidden_size, cfg.num_attention_heads * H, use_bias=True, **kw)
    self.k_proj = nnx.Linear(cfg.hidden_size, cfg.num_key_value_heads * H, use_bias=True, **kw)
    self.v_proj = nnx.Linear(cfg.hidden_size, cfg.num_key_value_heads * H, use_bias=True, **kw)
    self.o_proj = nnx.Linear(cfg.num_attention_heads * H, cfg.hidden_size, use_bias=False, **kw)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache=None, cache_index=None,
               prefix=None):
    """Self-attention; with `cache` ({'k','v'}: (B, K, S, H)) the new keys and values are written
    at `cache_index` and the queries attend over the whole cache (mask_BTS then spans it).
    With `prefix` (({'k','v'}: (P, K, A, H)), mask_PA) they first attend over a read-only prefix
    shared by each run of B / P rows (see `layers.attend_after_prefix`).

    Returns the output (B, T, D) and the updated cache (None without one).
    """
    B, T, _ = x_BTD.shape
    q_BTQH = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
    k_BTKH = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    cos, sin = cos_BTH[:, :, None], sin_BTH[:, :, None]
    q_BTQH = layers.apply_rotary(q_BTQH, cos, sin).astype(q_BTQH.dtype)
    k_BKTH = jnp.swapaxes(layers.apply_rotary(k_BTKH, cos, sin).astype(k_BTKH.dtype), 1, 2)
    v_BKTH = jnp.swapaxes(v_BTKH, 1, 2)
    k_BKSH, v_BKSH = k_BKTH, v_BKTH  # the keys attended: these alone, or the whole cache
    if cache is not None:
      write = lambda a_BKSH, new_BKTH: jax.lax.dynamic_update_slice(
          a_BKSH, new_BKTH.astype(a_BKSH.dtype), (0, 0, cache_index, 0))
      cache = {"k": write(cache["k"], k_BKTH), "v": write(cache["v"], v_BKTH)}
      k_BKSH, v_BKSH = cache["k"].astype(q_BTQH.dtype), cache["v"].astype(q_BTQH.dtype)
    if prefix is None:
      out_BTQH = layers.attend(q_BTQH, k_BKSH, v_BKSH, mask_BTS)
    else:
      shared, shared_mask_PA = prefix
      out_BTQH = layers.attend_after_prefix(q_BTQH, k_BKSH, v_BKSH, mask_BTS,
                                            shared["k"].astype(q_BTQH.dtype),
                                            shared["v"].astype(q_BTQH.dtype), shared_mask_PA)
    return self.o_proj(out_BTQH.reshape(B, T, -1)), cache


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                          param_dtype=param_dtype)
    self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                   param_dtype=param_dtype)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                             use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache=None, cache_index=None,
               prefix=None):
    attn_BTD, cache = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask_BTS,
                                     cache, cache_index, prefix)
    x_BTD = x_BTD + attn_BTD
    return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), cache


class TextModel(nnx.Module):
  """Embedding, decoder layers and final norm; the LM head lives on the top-level model."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool = False,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x_BTD, position_ids_3BT, mask_BTS, cache=None, cache_index=None,
               prefix=None):
    """Runs the decoder over input embeddings.

    Args:
      x_BTD: input embeddings.
      position_ids_3BT: M-RoPE ids.
      mask_BTS: True where query t may attend key s (S = T without a cache, the cache length with):
        a (B, T, S) array, or a `layers.CausalMask`, which lets long sequences take a fused kernel.
      cache: optional per-layer KV cache from `init_cache`, written at `cache_index`.
      prefix: optional (per-layer cache of P rows, mask_PA): keys all rows attend before their
        own, each prefix row shared by B / P adjacent rows; read, never written.

    Returns:
      Final-normed hidden states (B, T, D) and the updated cache (None without one).
    """
    cos_BTH, sin_BTH = mrope_cos_sin(position_ids_3BT, self.cfg, x_BTD.dtype)
    new_cache = []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      layer_prefix = None if prefix is None else (prefix[0][i], prefix[1])
      run = layers.call_rematerialised if self.remat else lambda f, *a: f(*a)
      x_BTD, layer_cache = run(layer, sharding_lib.constrain_rows(x_BTD), cos_BTH, sin_BTH, mask_BTS, layer_cache,
                               cache_index, layer_prefix)
      new_cache.append(layer_cache)
    return self.norm(x_BTD), (None if cache is None else tuple(new_cache))


def init_cache(cfg: TextConfig, batch: int, length: int, dtype) -> tuple[dict, ...]:
  """An empty KV cache: per layer {'k', 'v'} of shape (batch, K, length, H)."""
  shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(cfg.num_hidden_layers))

