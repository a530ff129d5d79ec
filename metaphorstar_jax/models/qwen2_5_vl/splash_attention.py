"""The decoder's long attentions as Pallas splash attention on TPU: fused, no score matrix in HBM.

Two forms, the two the decoder runs at length (prompts in prefill, completions in training):
- `causal`: T queries over their own T keys, causally; padding keys are excluded by segment ids.
- `after_prefix`: a group's G completion rows over [their prompt's A keys ; their own causal
  keys], run as one sequence of G·T queries per prompt against A + G·T keys under a static mask,
  so the shared prompt is read once per group, as in `layers.attend_after_prefix`.

The kernel's multi-query form serves each kv head and its R query heads (vmapped over rows and
kv heads). Sequences are padded to whole blocks. Inside `sharding.activations_on(mesh)` the
kernel runs per device under shard_map, rows split over the batch axes, since XLA cannot
partition a Pallas call itself. Queries that see no key return zeros, as `layers.attend`'s do.

Shape letters (README "Shape letters"): B rows, T queries (= own keys), Q = K·R query heads,
K kv heads, H head dim; P prompts, G = B / P rows per prompt, A prompt keys; a padded length
carries a trailing p (Tp, Ap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from metaphorstar_jax import sharding as sharding_lib

# Queries and keys per kernel block, forward and backward.
BLOCK = 512


def traced_platform() -> str:
  """The platform being compiled for: the traced mesh's (`sharding.activations_on`, which an
  ahead-of-time plan for a TPU sets on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def describe(platform: str) -> str:
  """One line for the run's log: which attention the decoder's long sequences use, and why."""
  if platform == "tpu":
    return "attention: Pallas splash attention (fused) for prompts and completions"
  if platform == "gpu":
    return ("attention: XLA blockwise online softmax, not cuDNN's fused attention: cuDNN masks "
            "padding by sequence lengths (right padding), and prompts here are left-padded")
  return f"attention: XLA blockwise online softmax on {platform} (the reference path)"


def _padded(n: int) -> int:
  return -(-n // BLOCK) * BLOCK


def _block_sizes() -> splash.BlockSizes:
  # The backward in two kernels (dq, then dk/dv): the fused one writes a partial dq per key block
  # and sums them after, which at the 7B completions (10,240 queries, 31 key blocks) was a
  # 4.2 GiB buffer per chip.
  return splash.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                           block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
                           block_q_dq=BLOCK, block_kv_dq=BLOCK, use_fused_bwd_kernel=False)


def _mqa_kernel(mask, R: int, interpret: bool):
  """The multi-query kernel for one kv head's R query heads, all under `mask`."""
  return splash.make_splash_mqa(masks.MultiHeadMask([mask] * R), block_sizes=_block_sizes(),
                                head_shards=1, q_seq_shards=1, interpret=interpret)


@functools.lru_cache(maxsize=None)
def _causal_kernel(Tp: int, R: int, interpret: bool):
  return _mqa_kernel(masks.CausalMask((Tp, Tp)), R, interpret)


def _shared_prompt_mask(Ap: int, G: int, Tp: int) -> np.ndarray:
  """(G·Tp, Ap + G·Tp): every query sees the prompt, and its own row's keys up to itself."""
  own = np.kron(np.eye(G, dtype=bool), np.tril(np.ones((Tp, Tp), bool)))
  return np.concatenate([np.ones((G * Tp, Ap), bool), own], axis=1)


@functools.lru_cache(maxsize=None)
def _after_prefix_kernel(Ap: int, G: int, Tp: int, R: int, interpret: bool):
  return _mqa_kernel(masks.NumpyMask(_shared_prompt_mask(Ap, G, Tp)), R, interpret)


def _pad_axis(x, axis: int, length: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _per_device(fn, *rows_first):
  """`fn(*rows_first)`, under shard_map over the traced mesh's batch axes when there is one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*rows_first)
  lead = rows_first[0].shape[0]
  spec = sharding_lib.fit_spec(jax.sharding.PartitionSpec(sharding_lib.BATCH_AXES), (lead,), mesh)
  specs = tuple(jax.sharding.PartitionSpec(*spec, *([None] * (a.ndim - 1))) for a in rows_first)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                       check_vma=False)(*rows_first)


def _heads(q_BTQH, K: int):
  """Scaled queries as (B, K, R, T, H), the multi-query kernel's layout per kv head."""
  B, T, Q, H = q_BTQH.shape
  q_BTKRH = (q_BTQH * jnp.asarray(H ** -0.5, q_BTQH.dtype)).reshape(B, T, K, Q // K, H)
  return jnp.transpose(q_BTKRH, (0, 2, 3, 1, 4))


def causal(q_BTQH, k_BKTH, v_BKTH, kv_valid_BT, *, interpret: bool = False):
  """Causal attention of T queries over their own T keys where `kv_valid_BT`: (B, T, Q, H).

  Equals `layers.attend` with mask causal & kv_valid (`interpret=True` runs the kernel's
  Pallas interpreter, on any platform).
  """
  _, T, Q, H = q_BTQH.shape
  K = k_BKTH.shape[1]
  Tp = _padded(T)
  kernel = _causal_kernel(Tp, Q // K, interpret)

  def run(q_BTQH, k_BKTH, v_BKTH, kv_valid_BT):
    b = q_BTQH.shape[0]  # this device's rows
    q_BKRTH = _pad_axis(_heads(q_BTQH, K), 3, Tp)
    k_BKTH, v_BKTH = _pad_axis(k_BKTH, 2, Tp), _pad_axis(v_BKTH, 2, Tp)
    # Real keys are segment 1, padding 0; every query is segment 1.
    kv_segment_BT = _pad_axis(kv_valid_BT.astype(jnp.int32), 1, Tp)
    q_segment_T = jnp.ones((Tp,), jnp.int32)
    per_head = lambda q_RTH, k_TH, v_TH, kv_segment_T: kernel(
        q_RTH, k_TH, v_TH, segment_ids=splash.SegmentIds(q_segment_T, kv_segment_T))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    out_BKRTH = jax.vmap(per_row)(q_BKRTH, k_BKTH, v_BKTH, kv_segment_BT)[..., :T, :]
    # A query before a row's first real key (left padding) sees nothing.
    sees_BT = jnp.cumsum(kv_valid_BT.astype(jnp.int32), axis=1) > 0
    out_BTQH = jnp.transpose(out_BKRTH, (0, 3, 1, 2, 4)).reshape(b, T, Q, H)
    return jnp.where(sees_BT[:, :, None, None], out_BTQH, 0).astype(v_BKTH.dtype)

  return _per_device(run, q_BTQH, k_BKTH, v_BKTH, kv_valid_BT)


def after_prefix(q_BTQH, k_BKTH, v_BKTH, kv_valid_BT, prefix_k_PKAH, prefix_v_PKAH,
                 prefix_valid_PA, *, interpret: bool = False):
  """Attention over [the row's prompt's keys where valid ; its own keys causally where valid],
  each prompt shared by G = B / P adjacent rows: (B, T, Q, H). Equals `layers.attend_after_prefix`
  with an own mask of causal & kv_valid.
  """
  B, T, Q, H = q_BTQH.shape
  P, K, A, _ = prefix_k_PKAH.shape
  G, Tp, Ap = B // P, _padded(T), _padded(A)
  kernel = _after_prefix_kernel(Ap, G, Tp, Q // K, interpret)

  def run(q_PGTQH, k_PGKTH, v_PGKTH, kv_valid_PGT, prefix_k_PKAH, prefix_v_PKAH,
          prefix_valid_PA):
    p = q_PGTQH.shape[0]  # this device's prompts
    # Each prompt's G rows as one sequence of G·Tp queries (row-major), keys after its prompt's.
    q_PKRgH = jnp.moveaxis(_pad_axis(_heads(q_PGTQH.reshape(p * G, T, Q, H), K), 3, Tp)
                           .reshape(p, G, K, Q // K, Tp, H), 1, 3).reshape(p, K, Q // K, G * Tp, H)
    own = lambda a_PGKTH: jnp.moveaxis(_pad_axis(a_PGKTH, 3, Tp), 1, 2).reshape(p, K, G * Tp, H)
    keys = lambda prefix_PKAH, a_PGKTH: jnp.concatenate(
        [_pad_axis(prefix_PKAH, 2, Ap), own(a_PGKTH)], axis=2)
    k_PKSH, v_PKSH = keys(prefix_k_PKAH, k_PGKTH), keys(prefix_v_PKAH, v_PGKTH)
    kv_segment_PS = jnp.concatenate(
        [_pad_axis(prefix_valid_PA.astype(jnp.int32), 1, Ap),
         _pad_axis(kv_valid_PGT.astype(jnp.int32), 2, Tp).reshape(p, G * Tp)], axis=1)
    q_segment_S = jnp.ones((G * Tp,), jnp.int32)
    per_head = lambda q_RgH, k_SH, v_SH, kv_segment_S: kernel(
        q_RgH, k_SH, v_SH, segment_ids=splash.SegmentIds(q_segment_S, kv_segment_S))
    per_prompt = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    out_PKRgH = jax.vmap(per_prompt)(q_PKRgH, k_PKSH, v_PKSH, kv_segment_PS)
    out_PGTQH = jnp.transpose(out_PKRgH.reshape(p, K, Q // K, G, Tp, H)[:, :, :, :, :T],
                              (0, 3, 4, 1, 2, 5)).reshape(p, G, T, Q, H)
    sees_PGT = (prefix_valid_PA.any(axis=1)[:, None, None]
                | (jnp.cumsum(kv_valid_PGT.astype(jnp.int32), axis=2) > 0))
    return jnp.where(sees_PGT[..., None, None], out_PGTQH, 0).astype(v_PGKTH.dtype)

  by_prompt = lambda a_B_: a_B_.reshape(P, G, *a_B_.shape[1:])
  out_PGTQH = _per_device(run, by_prompt(q_BTQH), by_prompt(k_BKTH), by_prompt(v_BKTH),
                          by_prompt(kv_valid_BT), prefix_k_PKAH, prefix_v_PKAH, prefix_valid_PA)
  return out_PGTQH.reshape(B, T, Q, H)
