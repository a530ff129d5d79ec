"""Building blocks shared by the ViT and the decoder: RMSNorm, SwiGLU, rotary helpers, attention.

Shape letters (README "Shape letters"): B rows, T query tokens, S keys, D width, Q query heads,
K kv heads, R query heads per kv head, H head dim, F rotary frequencies; for a shared prefix:
P prefix rows (prompts), G = B / P rows sharing each, A prefix keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import blockwise_attention, splash_attention

# Keys per block of the blockwise path, which attention takes once a head's score matrix would
# exceed ATTENTION_BLOCK² entries (long prompts, training on long completions); decode steps and
# short sequences keep the direct path, which is faster there.
ATTENTION_BLOCK = 512


def _blockwise(queries: int, keys: int) -> bool:
  return queries * keys > ATTENTION_BLOCK * ATTENTION_BLOCK


class CausalMask(NamedTuple):
  """The decoder's mask, kept in its parts: query t sees key s when s <= first_slot + t and key s
  is valid. Its structure is what a fused kernel needs; `dense` is the (B, T, S) form."""

  kv_valid_BS: jax.Array
  first_slot: jax.Array | int

  def dense(self, T: int):
    S = self.kv_valid_BS.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= self.first_slot + jnp.arange(T)[:, None]
    return causal_TS[None] & self.kv_valid_BS[:, None, :]


def _dense(mask, T: int):
  """The (B, T, S) form of a mask given as an array or a `CausalMask`."""
  return mask.dense(T) if isinstance(mask, CausalMask) else mask


def _splash(mask, T: int, S: int) -> bool:
  """Whether this attention runs the TPU kernel: a causal mask over the queries' own slots (T == S,
  so it starts at slot 0), long enough for the blockwise path, traced for a TPU."""
  return (isinstance(mask, CausalMask) and T == S and _blockwise(T, S)
          and splash_attention.traced_platform() == "tpu")

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


# Tokens per piece of a decoder MLP over a long sequence. Its (rows, tokens, intermediate)
# activations are a layer's largest buffers, and the 7B gradient's backward held eight of them at
# once for the completions (0.74 GiB each per chip on a v5p-8); in pieces only gate and up are kept
# whole, and the rest exist one piece at a time.
MLP_PIECE = 1024
_MLP_GATE, _MLP_UP = "mlp_gate", "mlp_up"
# What a piece keeps for its backward pass: the two projections, not what is elementwise from them.
_SAVE_GATE_AND_UP = jax.checkpoint_policies.save_only_these_names(_MLP_GATE, _MLP_UP)


def _pieces(T: int, most: int) -> tuple[int, int]:
  """(count, length) of the fewest pieces of at most about `most` tokens covering T, each a
  multiple of 8 long (TPU tiles), so that padding stays under 8 tokens a piece."""
  count = -(-T // most)
  length = -(-T // count)
  return count, -(-length // 8) * 8


def in_pieces(fn, x_BTD, most: int):
  """fn (token-wise: each token's output depends on that token alone) over x_BTD's tokens in
  pieces of about `most`, under `lax.scan`: the same values as fn(x_BTD), with fn's
  intermediates alive for one piece at a time, forward and backward. Each piece keeps for its
  backward pass only what fn names `_MLP_GATE` or `_MLP_UP` (SwiGLU's projections) and
  recomputes the rest."""
  B, T, D = x_BTD.shape
  count, length = _pieces(T, most)
  x_BTD = jnp.pad(x_BTD, ((0, 0), (0, count * length - T), (0, 0)))
  x_nBcD = sharding_lib.constrain_rows(
      jnp.moveaxis(x_BTD.reshape(B, count, length, D), 1, 0), axis=1)
  body = jax.checkpoint(lambda carry, x_BcD: (carry, fn(x_BcD)), policy=_SAVE_GATE_AND_UP)
  _, y_nBcE = jax.lax.scan(body, None, x_nBcD)
  return jnp.moveaxis(y_nBcE, 0, 1).reshape(B, count * length, -1)[:, :T]


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); biases on in the ViT, off in the decoder. A decoder input
  (B, T, D) longer than MLP_PIECE tokens goes through in pieces (`in_pieces`)."""

  def __init__(self, dim: int, hidden: int, act: str, *, use_bias: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(dim, hidden, **kw)
    self.up_proj = nnx.Linear(dim, hidden, **kw)
    self.down_proj = nnx.Linear(hidden, dim, **kw)
    self.act = activation(act)

  def _whole(self, x):
    gate = checkpoint_name(self.gate_proj(x), _MLP_GATE)
    up = checkpoint_name(self.up_proj(x), _MLP_UP)
    return self.down_proj(self.act(gate) * up)

  def __call__(self, x):
    if x.ndim == 3 and x.shape[1] > MLP_PIECE:
      return in_pieces(self._whole, x, MLP_PIECE)
    return self._whole(x)


_LAYER_INPUT = "layer_input"
# Nothing saved on the accelerator; each layer's input copied to host memory in the forward
# pass and back in the backward, where the layer is recomputed from it.
_OFFLOAD_LAYER_INPUT = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=[_LAYER_INPUT],
    offload_src="device", offload_dst="pinned_host")


def stack(make, count: int, rngs: nnx.Rngs) -> nnx.Module:
  """`count` independently initialised `make(rngs)` modules as one, each parameter stacked on a
  leading layer axis (L, ...), for `scan`."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=0, out_axes=0)
  def build(rngs):
    return make(rngs)

  return build(rngs)


def scan(stacked: nnx.Module, step, carry, xs, *, remat: bool, offload: bool = False):
  """Runs `carry, y = step(layer, carry, x)` over the layers of `stacked` in order.

  Args:
    stacked: a module from `stack`; layer l sees slice l of every parameter.
    step: called with one layer's module, the carry and slice l of `xs`.
    carry: e.g. the hidden states, threaded through the layers.
    xs: a pytree of per-layer inputs with a leading L axis (or None).
    remat: rematerialise each layer in the backward pass: only the carry entering it is kept.
    offload: with remat, keep those carries in host memory (pinned_host) until the backward
      pass reads them, rather than on the accelerator.

  Returns:
    The last carry and the `y`s stacked on a leading L axis. One compiled body serves every
    layer, so compile time does not grow with depth. A pure `lax.scan` (with `jax.checkpoint`)
    over the split state: nothing is written back to the module, so it is valid inside any
    trace (a sampler's `lax.while_loop`), and with remat but without a gradient it computes
    exactly what the plain scan does.
  """
  graphdef, state = nnx.split(stacked)

  def body(carry, layer_xs):
    layer_state, x = layer_xs
    # The barrier was meant to keep each layer's cast to the compute dtype inside the loop. It
    # does not: libtpu's bfloat16-propagation pass, after fusion, finds the loop reads the f32
    # stack only through that cast and casts the whole stack before the loop (2.7 GiB per chip
    # on the 7B gradient; with the pass off, xla_jf_bf16_propagation=false, 0.8 GiB less). It
    # stays because the plans quoted were compiled with it.
    layer_state = jax.lax.optimization_barrier(sharding_lib.constrain_layer(layer_state))
    if offload:  # the name the policy below sends to host memory
      carry = jax.tree.map(lambda a: checkpoint_name(a, _LAYER_INPUT), carry)
    return step(nnx.merge(graphdef, layer_state), carry, x)

  if remat:
    policy = _OFFLOAD_LAYER_INPUT if offload else None
    body = jax.checkpoint(body, policy=policy)
  # Unrolled when compiling for a CPU: there XLA's loop made the 'small' model's GRPO update 56%
  # slower (bench/grpo_step.py: 3.70 s rolled, 2.37 s unrolled; 2.42 s before the layers were
  # scanned), while a CPU compiles small models, whose unrolled depth costs little. Accelerators
  # keep one loop body, which is what keeps a 7B compile flat in depth.
  unroll = splash_attention.traced_platform() == "cpu"
  return jax.lax.scan(body, carry, (state, xs), unroll=unroll)


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
  """x·cos + rotate_half(x)·sin, in whatever dtype the caller chose for x, cos and sin."""
  return x * cos + rotate_half(x) * sin


def inverse_frequencies(rotary_dim: int, theta: float):
  """1 / theta^(2j / rotary_dim) for j < rotary_dim / 2, in fp32: (rotary_dim // 2,)."""
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def attend(q_BTQH, k_BKSH, v_BKSH, mask_BTS, *, blockwise: bool | None = None):
  """Softmax attention with grouped kv heads; logits and softmax in fp32.

  `mask_BTS`: a (B, T, S) array, or a `CausalMask`, which on TPU takes long sequences to the
  fused kernel (`splash_attention.causal`).
  `blockwise`: walk the keys in blocks (`blockwise_attention`) instead of forming each head's
  (T × S) scores; None decides by size (see ATTENTION_BLOCK).

  Keys and values come kv-head-major, (B, K, S, H), the KV cache's layout: both products then
  read them in place, where (B, S, K, H) made XLA copy the whole cache every decode step.
  mask_BTS is True where a query may see a key. Rows with no visible key return zeros rather
  than NaN (left padding produces them).
  """
  B, T, Q, H = q_BTQH.shape
  K = k_BKSH.shape[1]
  if blockwise is None and _splash(mask_BTS, T, k_BKSH.shape[2]):
    return splash_attention.causal(q_BTQH, k_BKSH, v_BKSH, mask_BTS.kv_valid_BS)
  mask_BTS = _dense(mask_BTS, T)
  if blockwise if blockwise is not None else _blockwise(T, k_BKSH.shape[2]):
    out_BTQH, _ = blockwise_attention.attention_with_lse(q_BTQH, k_BKSH, v_BKSH, mask_BTS,
                                                         ATTENTION_BLOCK)
    return out_BTQH.astype(v_BKSH.dtype)
  q_BTKRH = q_BTQH.reshape(B, T, K, Q // K, H)
  logits_BKRTS = jnp.einsum("btkrh,bksh->bkrts", q_BTKRH, k_BKSH,
                            preferred_element_type=jnp.float32) * (H ** -0.5)
  mask_B11TS = mask_BTS[:, None, None]
  logits_BKRTS = jnp.where(mask_B11TS, logits_BKRTS, jnp.finfo(jnp.float32).min)
  probs_BKRTS = jax.nn.softmax(logits_BKRTS, axis=-1)
  probs_BKRTS = jnp.where(mask_B11TS, probs_BKRTS, 0.0).astype(v_BKSH.dtype)
  # Heads-major output keeps this a plain batched matmul; the transpose after it is small.
  out_BKRTH = jnp.einsum("bkrts,bksh->bkrth", probs_BKRTS, v_BKSH)
  return jnp.transpose(out_BKRTH, (0, 3, 1, 2, 4)).reshape(B, T, Q, H)


def attend_after_prefix(q_BTQH, k_BKSH, v_BKSH, mask_BTS, prefix_k_PKAH, prefix_v_PKAH,
                        prefix_mask_PA):
  """`attend` over [prefix keys ; own keys], each prefix row shared by G = B / P adjacent rows.

  Matches `attend` on the prefix tiled G times and put before the own keys, up to rounding (the
  softmax is split in two with a shared max and sum), without reading each shared prompt's keys
  G times: in group sampling that read was most of attention's cost. `mask_BTS` (own keys) may
  be a `CausalMask`, as in `attend` (TPU: `splash_attention.after_prefix`).
  """
  B, T, Q, H = q_BTQH.shape
  P, K, A, _ = prefix_k_PKAH.shape
  G, R = B // P, Q // K
  if _splash(mask_BTS, T, k_BKSH.shape[2]):
    return splash_attention.after_prefix(q_BTQH, k_BKSH, v_BKSH, mask_BTS.kv_valid_BS,
                                         prefix_k_PKAH, prefix_v_PKAH, prefix_mask_PA)
  mask_BTS = _dense(mask_BTS, T)
  if _blockwise(T, A + k_BKSH.shape[2]):
    own = blockwise_attention.attention_with_lse(q_BTQH, k_BKSH, v_BKSH, mask_BTS,
                                                 ATTENTION_BLOCK)
    # The G rows that share a prefix row query it together, as one row of G·T queries.
    shared_out, shared_lse = blockwise_attention.attention_with_lse(
        q_BTQH.reshape(P, G * T, Q, H), prefix_k_PKAH, prefix_v_PKAH, prefix_mask_PA[:, None],
        ATTENTION_BLOCK)
    out_BTQH, _ = blockwise_attention.merge(*own, shared_out.reshape(B, T, Q, H),
                                            shared_lse.reshape(B, T, Q))
    return out_BTQH.astype(v_BKSH.dtype)
  lowest = jnp.finfo(jnp.float32).min
  q_BTKRH = q_BTQH.reshape(B, T, K, R, H)
  own_BKRTS = jnp.einsum("btkrh,bksh->bkrts", q_BTKRH, k_BKSH,
                         preferred_element_type=jnp.float32) * (H ** -0.5)
  shared_PKGRTA = jnp.einsum("pgtkrh,pkah->pkgrta", q_BTKRH.reshape(P, G, T, K, R, H),
                             prefix_k_PKAH, preferred_element_type=jnp.float32) * (H ** -0.5)
  own_mask_B11TS = mask_BTS[:, None, None]
  shared_mask_P1111A = prefix_mask_PA[:, None, None, None, None, :]
  own_BKRTS = jnp.where(own_mask_B11TS, own_BKRTS, lowest)
  shared_PKGRTA = jnp.where(shared_mask_P1111A, shared_PKGRTA, lowest)
  to_rows = lambda a_PKGRT_: jnp.swapaxes(a_PKGRT_, 1, 2).reshape(B, K, R, T, *a_PKGRT_.shape[5:])
  to_prefix = lambda a_BKRT: jnp.swapaxes(a_BKRT.reshape(P, G, K, R, T), 1, 2)
  max_BKRT = jnp.maximum(own_BKRTS.max(axis=-1), to_rows(shared_PKGRTA.max(axis=-1)))
  own_BKRTS = jnp.where(own_mask_B11TS, jnp.exp(own_BKRTS - max_BKRT[..., None]), 0.0)
  shared_PKGRTA = jnp.where(shared_mask_P1111A,
                            jnp.exp(shared_PKGRTA - to_prefix(max_BKRT)[..., None]), 0.0)
  sum_BKRT = own_BKRTS.sum(axis=-1) + to_rows(shared_PKGRTA.sum(axis=-1))
  # Rows with no visible key keep zero probabilities (and output), as in `attend`.
  sum_BKRT = jnp.where(sum_BKRT > 0, sum_BKRT, 1.0)
  own_BKRTS = (own_BKRTS / sum_BKRT[..., None]).astype(v_BKSH.dtype)
  shared_PKGRTA = (shared_PKGRTA / to_prefix(sum_BKRT)[..., None]).astype(v_BKSH.dtype)
  out_BKRTH = (jnp.einsum("bkrts,bksh->bkrth", own_BKRTS, v_BKSH)
               + to_rows(jnp.einsum("pkgrta,pkah->pkgrth", shared_PKGRTA, prefix_v_PKAH)))
  return jnp.transpose(out_BKRTH, (0, 3, 1, 2, 4)).reshape(B, T, Q, H)
