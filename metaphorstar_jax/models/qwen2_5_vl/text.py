"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v biases, RMSNorm, SwiGLU, M-RoPE.

Shape letters (README "Shape letters"): B rows, T tokens, S keys, D width, Q query heads,
K kv heads, H head dim, F = H / 2; for a shared prefix: P prefix rows, A prefix keys;
L layers (stacked on a leading axis and scanned).
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
               prefix=None, layer=None):
    """Self-attention; with `cache` ({'k','v'}: (B, K, S, H), or every layer's (L, B, K, S, H)
    with `layer` naming this one) the new keys and values are written at `cache_index` and the
    queries attend over the whole cache (mask_BTS then spans it).
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
      if layer is None:
        write = lambda a_BKSH, new_BKTH: jax.lax.dynamic_update_slice(
            a_BKSH, new_BKTH.astype(a_BKSH.dtype), (0, 0, cache_index, 0))
        read = lambda a_BKSH: a_BKSH
      else:  # every layer's cache: this layer's slot is written in place, its slice read
        write = lambda a_LBKSH, new_BKTH: jax.lax.dynamic_update_slice(
            a_LBKSH, new_BKTH[None].astype(a_LBKSH.dtype), (layer, 0, 0, cache_index, 0))
        read = lambda a_LBKSH: a_LBKSH[layer]
      cache = {"k": write(cache["k"], k_BKTH), "v": write(cache["v"], v_BKTH)}
      k_BKSH, v_BKSH = (read(cache[name]).astype(q_BTQH.dtype) for name in ("k", "v"))
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
               prefix=None, layer=None):
    attn_BTD, cache = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask_BTS,
                                     cache, cache_index, prefix, layer)
    x_BTD = x_BTD + attn_BTD
    return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), cache


class TextModel(nnx.Module):
  """Embedding, decoder layers (stacked, run under `layers.scan`) and final norm; the LM head
  lives on the top-level model."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, remat: bool = False,
               offload: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.offload = offload  # with remat: each layer's saved input in host memory
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = layers.stack(
        lambda rngs: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        cfg.num_hidden_layers, rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x_BTD, position_ids_3BT, mask_BTS, cache=None, cache_index=None,
               prefix=None):
    """Runs the decoder over input embeddings.

    Args:
      x_BTD: input embeddings.
      position_ids_3BT: M-RoPE ids.
      mask_BTS: True where query t may attend key s (S = T without a cache, the cache length with):
        a (B, T, S) array, or a `layers.CausalMask`, which lets long sequences take a fused kernel.
      cache: optional KV cache from `init_cache`, written at `cache_index`. One the T new tokens
        fill (S = T: a prompt pass) comes out of the scan layer by layer, so a gradient through
        it keeps one layer's keys per step; a longer one (decoding) is written in place in the
        scan's carry, where a per-layer output would be a second copy of it. Do not take
        gradients through the latter: every layer's step would keep the whole cache.
      prefix: optional (cache of P rows, mask_PA): keys all rows attend before their own, each
        prefix row shared by B / P adjacent rows; read, never written.

    Returns:
      Final-normed hidden states (B, T, D) and the updated cache (None without one).
    """
    cos_BTH, sin_BTH = mrope_cos_sin(position_ids_3BT, self.cfg, x_BTD.dtype)
    in_place = cache is not None and cache["k"].shape[3] > x_BTD.shape[1]
    prefix_cache, prefix_mask_PA = (None, None) if prefix is None else prefix

    def step(layer, carry, xs):
      x_BTD, carried_cache = carry
      x_BTD = sharding_lib.constrain_rows(x_BTD)
      index, layer_cache, layer_prefix = xs
      layer_prefix = None if layer_prefix is None else (layer_prefix, prefix_mask_PA)
      if in_place:
        x_BTD, carried_cache = layer(x_BTD, cos_BTH, sin_BTH, mask_BTS, carried_cache,
                                     cache_index, layer_prefix, index)
      else:
        x_BTD, layer_cache = layer(x_BTD, cos_BTH, sin_BTH, mask_BTS, layer_cache, cache_index,
                                   layer_prefix)
      return (x_BTD, carried_cache), layer_cache

    layer_index_L = jnp.arange(self.cfg.num_hidden_layers)
    (x_BTD, carried_cache), layer_caches = layers.scan(
        self.layers, step, (x_BTD, cache if in_place else None),
        (layer_index_L, None if in_place else cache, prefix_cache), remat=self.remat,
        offload=self.offload)
    return self.norm(x_BTD), carried_cache if in_place else layer_caches

  def with_continuation(self, x_PTD, position_ids_3PT, valid_PT, x_BZD, position_ids_3BZ,
                        valid_BZ):
    """Prompts and their continuations in one scan over the layers: at each layer the P prompts'
    keys are computed and the B continuation rows (each run of B / P rows continuing one prompt)
    attend to them, then causally to their own. Equal to a prompt pass filling a cache followed
    by a pass with it as `prefix`, but each layer's weight gradient is summed in the loop, where
    two scans would each hold every layer's.

    Returns:
      Final-normed hidden states of the prompts (P, T, D) and of the continuations (B, Z, D).
    """
    prompt_cos, prompt_sin = mrope_cos_sin(position_ids_3PT, self.cfg, x_PTD.dtype)
    cos_BZH, sin_BZH = mrope_cos_sin(position_ids_3BZ, self.cfg, x_BZD.dtype)
    prompt_mask = layers.CausalMask(valid_PT, 0)
    mask = layers.CausalMask(valid_BZ, 0)
    (P, T, _), (B, Z, _) = x_PTD.shape, x_BZD.shape
    empty = lambda rows, length: {name: jnp.zeros((rows, self.cfg.num_key_value_heads, length,
                                                   self.cfg.head_dim), x_PTD.dtype)
                                  for name in ("k", "v")}

    def step(layer, carry, _):
      x_PTD, x_BZD = (sharding_lib.constrain_rows(x) for x in carry)
      x_PTD, prompt_cache = layer(x_PTD, prompt_cos, prompt_sin, prompt_mask, empty(P, T), 0)
      x_BZD, _ = layer(x_BZD, cos_BZH, sin_BZH, mask, empty(B, Z), 0, (prompt_cache, valid_PT))
      return (x_PTD, x_BZD), None

    (x_PTD, x_BZD), _ = layers.scan(self.layers, step, (x_PTD, x_BZD), None, remat=self.remat,
                                    offload=self.offload)
    return self.norm(x_PTD), self.norm(x_BZD)


def init_cache(cfg: TextConfig, batch: int, length: int, dtype) -> dict:
  """An empty KV cache: {'k', 'v'}, each every layer's (L, batch, K, length, H)."""
  shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
