"""Building blocks shared by the ViT and the decoder: RMSNorm, SwiGLU, rotary helpers, attention.

Shape letters: B batch, T query tokens, S key tokens, D width, N query heads, K kv heads,
G query heads per kv head, H head dim, F rotary frequencies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu,
                "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


class RMSNorm(nnx.Module):
  """RMSNorm with fp32 statistics, cast back to the input dtype before the scale (as HF does)."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); biases on in the ViT, off in the decoder."""

  def __init__(self, dim: int, hidden: int, act: str, *, use_bias: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(dim, hidden, **kw)
    self.up_proj = nnx.Linear(dim, hidden, **kw)
    self.down_proj = nnx.Linear(hidden, dim, **kw)
    self.act = activation(act)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
  """x·cos + rotate_half(x)·sin, in whatever dtype the caller chose for x, cos and sin."""
  return x * cos + rotate_half(x) * sin


def inverse_frequencies(rotary_dim: int, theta: float):
  """1 / theta^(2j / rotary_dim) for j < rotary_dim / 2, in fp32: (rotary_dim // 2,)."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Softmax attention with grouped kv heads; logits and softmax in fp32.

  mask_BTS is True where a query may see a key. Rows with no visible key return zeros rather
  than NaN (left padding produces them).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * (H ** -0.5)
  mask_B11TS = mask_BTS[:, None, None]
  logits_BKGTS = jnp.where(mask_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.where(mask_B11TS, probs_BKGTS, 0.0).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)
