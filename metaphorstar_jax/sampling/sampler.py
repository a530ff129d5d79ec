"""Batched on-device rollouts for Qwen2.5-VL: P prompts × G samples per call.

Each prompt's images are encoded and its prompt prefilled once; its G rows then share that KV
cache (each row attends over its prompt's cache, never tiled, and its own completion cache) and
one `lax.while_loop` decodes every row until all rows have stopped or spent their budget.
Weights are arguments of the two jitted functions, so a policy update never recompiles;
prompt length, patch count and image count are padded to buckets so a run compiles few programs.

Shape letters (README "Shape letters"): P prompts, G samples per prompt, B rows (P·G), T prompt
tokens (bucketed), N new tokens (max_new_tokens), D width, V vocabulary, X patches, Y values per
patch, I images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from metaphorstar_jax import rl
from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import Qwen2_5_VL
from metaphorstar_jax.sampling import logits_processing

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How rollouts are drawn. Every field is static: changing one compiles new programs.

  stop_token_ids / banned_token_ids: None takes them from the model config (stops: <|im_end|> and
  <|endoftext|>; banned: the vision special tokens, which break the next forward pass if sampled).
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  stop_token_ids: tuple[int, ...] | None = None
  banned_token_ids: tuple[int, ...] | None = None
  min_prompt_bucket: int = 64
  min_patch_bucket: int = 64
  cache_dtype: str | None = None  # default: the model's compute dtype
  # Also return each position's entropy of softmax(logits / temperature) over the whole
  # vocabulary, the trainer's entropy (tree rollouts branch where it is high).
  return_entropy: bool = False
  # Encode and prefill this many prompts at a time (0: the whole batch at once), so that one
  # chunk's ViT and prompt activations are live, not the generation batch's; decoding still runs
  # every row together. It must divide the number of prompts.
  prefill_chunk: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"temperature must be positive (or use greedy=True), got "
                       f"{self.temperature}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
    if self.prefill_chunk < 0:
      raise ValueError(f"prefill_chunk must be ≥ 0 (0: no chunks), got {self.prefill_chunk}.")

  def prefill_chunks(self, num_prompts: int) -> int:
    """How many chunks the prefill of `num_prompts` prompts runs in."""
    chunk = self.prefill_chunk
    if not chunk or chunk >= num_prompts:
      return 1
    if num_prompts % chunk:
      raise ValueError(f"prefill_chunk={chunk} does not divide the {num_prompts} prompts of this "
                       "batch; use a divisor of the generation batch (train.prefill_chunk).")
    return num_prompts // chunk


class Rollouts(NamedTuple):
  """Per-row results of one call; row p·G + g is sample g of prompt p.

  tokens_BN: completion tokens (pad after the row stopped).
  mask_BN: 1 on generated tokens, the stop token included.
  logprobs_BN: log softmax(logits / temperature) of each sampled token, 0 where masked.
  lengths_B: number of generated tokens.
  truncated_B: True where the row hit its budget without a stop token.
  prompt_index_B: p for each row.
  entropy_BN: with `return_entropy`, the entropy of the distribution each token was drawn from
    (before top-k/top-p and bans), 0 where masked; else None.
  """

  tokens_BN: Any
  mask_BN: Any
  logprobs_BN: Any
  lengths_B: Any
  truncated_B: Any
  prompt_index_B: Any
  entropy_BN: Any = None


def _bucket(n: int, minimum: int) -> int:
  """Smallest power-of-two multiple of `minimum` that holds n."""
  size = minimum
  while size < n:
    size *= 2
  return size


def left_align(input_ids_PT, attention_mask_PT, length: int, pad_id: int):
  """Moves each prompt's real tokens to the right end of a `length`-token row (left padding)."""
  ids = np.asarray(input_ids_PT)
  mask = np.asarray(attention_mask_PT).astype(bool)
  out_ids = np.full((ids.shape[0], length), pad_id, np.int32)
  out_mask = np.zeros((ids.shape[0], length), np.int32)
  for p in range(ids.shape[0]):
    real = ids[p][mask[p]]
    out_ids[p, length - len(real):] = real
    out_mask[p, length - len(real):] = 1
  return out_ids, out_mask


def pad_images(pixel_values_XY, image_grid_thw_I3, num_patches: int, num_images: int):
  """Pads patches and grids to bucket sizes without changing any real image's features.

  The padding patches form one extra image of grid (1, 2, pad/2) whose features no token reads;
  further grid rows are (0, 0, 0), images with no patches.
  """
  pixels = np.asarray(pixel_values_XY, np.float32)
  grids = np.asarray(image_grid_thw_I3, np.int32).reshape(-1, 3)
  pad = num_patches - pixels.shape[0]
  if pad:
    pixels = np.concatenate([pixels, np.zeros((pad, pixels.shape[1]), np.float32)])
    grids = np.concatenate([grids, [[1, 2, pad // 2]]])
  grids = np.concatenate([grids, np.zeros((num_images - grids.shape[0], 3), np.int32)])
  return pixels, grids.astype(np.int32)


def _merge_chunks(a, axis: int):
  """lax.map's (K, ..., C, ...) outputs, rows at `axis` + 1, as the batch's (..., C·K, ...): row
  c·K + k is row c of chunk k."""
  a = jnp.moveaxis(a, 0, axis + 1)
  return a.reshape(*a.shape[:axis], -1, *a.shape[axis + 2:])


class Sampler:
  """Draws groups of rollouts from a Qwen2.5-VL model.

      sampler = Sampler(model, SamplingConfig(max_new_tokens=128, temperature=1.0, top_p=0.99))
      rollouts = sampler(batch, group_size=5, key=jax.random.key(0))       # the model's weights
      rollouts = sampler(batch, group_size=5, key=key, state=new_params)  # no recompile

  A trainer builds its samplers with `keep_weights=False`: they hold no arrays and every call
  passes `state=`. Its updates donate the parameters, and a split of the model shares their
  buffers, so a sampler that kept one would be left holding deleted arrays after the first update.
  The sampler itself donates only what it allocates (the decode loop's carry: KV cache, tokens).
  `compiler_options` maps 'prefill' and 'decode' to XLA options (a trainer's memory budgets).
  """

  def __init__(self, model: Qwen2_5_VL, config: SamplingConfig, mesh: Mesh | None = None, *,
               keep_weights: bool = True,
               compiler_options: Mapping[str, dict | None] | None = None):
    self.graphdef = nnx.graphdef(model)
    self.state = nnx.state(model) if keep_weights else None
    self.model_config = model.config
    self.mesh = mesh
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    stops = config.stop_token_ids
    if stops is None:
      stops = tuple(t for t in dict.fromkeys(eos + (cfg.pad_token_id, cfg.bos_token_id))
                    if t is not None)
    banned = config.banned_token_ids
    if banned is None:
      banned = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                cfg.vision_end_token_id)
    self.config = dataclasses.replace(config, stop_token_ids=tuple(stops),
                                      banned_token_ids=tuple(banned))
    # Qwen pads with <|endoftext|>, which the configs also name as bos.
    self.pad_id = next((t for t in (cfg.pad_token_id, cfg.bos_token_id) if t is not None), 0)
    self.compiled_programs = 0  # incremented while tracing, i.e. once per compiled program
    options = dict(compiler_options or {}).get  # by program name, e.g. its memory budget
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("group_size", "new_tokens"),
                            compiler_options=options("prefill"))
    self._decode = jax.jit(self._decode_fn, donate_argnames=("carry",),
                           compiler_options=options("decode"))

  # --- traced functions --------------------------------------------------------------------

  # The prefill's outputs whose rows are dimension 1: KV caches stack the layers in front.
  CACHE_OUTPUTS = ("prompt_cache", "cache")

  def _row_axis(self, output: str) -> int:
    return int(output in self.CACHE_OUTPUTS)

  def prefill_shardings(self, prefilled: dict) -> dict:
    """The shardings the prefill gives its outputs (arrays or ShapeDtypeStructs, by name) on
    the mesh: rows over the batch axes where they divide."""
    return {name: jax.tree.map(lambda x, axis=self._row_axis(name):
                               sharding_lib.row_sharding(x.shape, self.mesh, axis), value)
            for name, value in prefilled.items()}

  def _prefill_fn(self, state, input_ids_PT, attention_mask_PT, pixel_values_XY, image_grid_thw_I3,
                  *, group_size: int, new_tokens: int):
    """With K = prefill_chunks(P) > 1, pixel_values_XY is (K, X, Y) and image_grid_thw_I3
    (K, I, 3), chunk k holding the images of prompts k, K + k, 2K + k, ... (`chunk_images`):
    strided, so that each device's rows stay on it."""
    self.compiled_programs += 1
    model = nnx.merge(self.graphdef, state)
    P = input_ids_PT.shape[0]
    K = self.config.prefill_chunks(P)
    cache_dtype = jnp.dtype(self.config.cache_dtype or model.config.compute_dtype)

    def prefill(ids_PT, mask_PT, pixels, grids):
      hidden_PTD, prompt_cache, prompt_valid_PT, next_position_P = model.prefill(
          ids_PT, mask_PT, pixels, grids, cache_dtype=cache_dtype)
      return dict(prompt_cache=prompt_cache, prompt_valid=prompt_valid_PT,
                  next_position=next_position_P,
                  logits=model.logits(hidden_PTD[:, -1]).astype(jnp.float32))

    with sharding_lib.activations_on(self.mesh):  # rows over the batch axes, where they divide
      if K == 1:
        prefilled = prefill(input_ids_PT, attention_mask_PT, pixel_values_XY, image_grid_thw_I3)
      else:  # row c·K + k of the batch is row c of chunk k, both ways
        split = lambda a: a.reshape(P // K, K, *a.shape[1:]).swapaxes(0, 1)
        chunked = jax.lax.map(lambda xs: prefill(*xs), (
            split(input_ids_PT), split(attention_mask_PT), pixel_values_XY, image_grid_thw_I3))
        prefilled = {name: jax.tree.map(lambda a, axis=self._row_axis(name):
                                        _merge_chunks(a, axis), value)
                     for name, value in chunked.items()}
      tile = lambda a: jnp.repeat(a, group_size, axis=0)
      prefilled = dict(prefilled, cache=model.init_cache(P * group_size, new_tokens, cache_dtype),
                       logits=tile(prefilled["logits"]),
                       next_position=tile(prefilled["next_position"]))
      if self.mesh is None:
        return prefilled
      return jax.tree.map(jax.lax.with_sharding_constraint, prefilled,
                          self.prefill_shardings(prefilled))

  def _decode_fn(self, state, carry, key, budget_B):
    self.compiled_programs += 1
    cfg = self.config
    model = nnx.merge(self.graphdef, state)
    stop_ids = jnp.asarray(cfg.stop_token_ids, jnp.int32)
    # Log-probs and entropy are the trainer's (rl.logprobs) at the sampling temperature: over the
    # whole vocabulary, before bans and top-k/top-p; greedy rows are scored at temperature 1.
    temperature = 1.0 if cfg.greedy else cfg.temperature
    B, N = carry["tokens"].shape
    prefix = (carry["prompt_cache"], carry["prompt_valid"])
    # Completion slots count as valid from the start; causality hides the ones not yet written.
    kv_valid_BN = jnp.ones((B, N), bool)

    def cond(c):
      return (c["step"] < N) & ~jnp.all(c["done"])

    def body(c):
      step_key = jax.random.fold_in(key, c["step"])
      active_B = ~c["done"]
      tokens_B = logits_processing.next_tokens(
          step_key, c["logits"], greedy=cfg.greedy, temperature=cfg.temperature,
          top_k=cfg.top_k, top_p=cfg.top_p, banned_ids=cfg.banned_token_ids)
      if cfg.return_entropy:
        logprobs_B, entropy_B = rl.token_logprobs_and_entropy(c["logits"], tokens_B,
                                                              temperature=temperature)
        c = dict(c, entropy=c["entropy"].at[:, c["step"]].set(
            jnp.where(active_B, entropy_B, 0.0)))
      else:
        logprobs_B = rl.token_logprobs(c["logits"], tokens_B, temperature=temperature)
      tokens_B = jnp.where(active_B, tokens_B, self.pad_id)
      lengths_B = c["lengths"] + active_B
      stopped_B = active_B & jnp.isin(tokens_B, stop_ids)
      done_B = c["done"] | stopped_B | (lengths_B >= budget_B)
      x_B1D = model.embed(tokens_B[:, None])
      positions_3B1 = jnp.broadcast_to(c["next_position"][None, :, None], (3, B, 1))
      hidden_B1D, cache = model.cached_hidden_states(x_B1D, positions_3B1, c["cache"],
                                                     c["step"], kv_valid_BN, prefix)
      return dict(
          c,
          step=c["step"] + 1,
          cache=cache,
          logits=model.logits(hidden_B1D[:, 0]).astype(jnp.float32),
          next_position=c["next_position"] + 1,
          tokens=c["tokens"].at[:, c["step"]].set(tokens_B),
          logprobs=c["logprobs"].at[:, c["step"]].set(jnp.where(active_B, logprobs_B, 0.0)),
          lengths=lengths_B,
          stopped=c["stopped"] | stopped_B,
          done=done_B,
      )

    return jax.lax.while_loop(cond, body, carry)

  # --- host side ---------------------------------------------------------------------------

  def _place_rows(self, array):
    return sharding_lib.place_rows(array, self.mesh)

  def prepare(self, batch: dict[str, np.ndarray]):
    """Left-aligns prompts and pads them, their patches and grids to bucket sizes."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pixels is None or np.shape(pixels)[0] == 0:
      pixels, grids = None, None
    prompt_len, num_patches, num_images = self.padded_sizes(
        int(np.asarray(mask).sum(axis=1).max()), 0 if pixels is None else np.shape(pixels)[0],
        0 if grids is None else np.shape(grids)[0])
    ids, mask = left_align(ids, mask, prompt_len, self.pad_id)
    if pixels is not None:
      pixels, grids = pad_images(pixels, grids, num_patches, num_images)
    return ids, mask, pixels, grids

  def chunk_images(self, input_ids_PT, pixel_values_XY, image_grid_thw_I3, chunks: int):
    """The batch's packed patches and grids regrouped by prefill chunk: (K, X', Y) and (K, I', 3),
    chunk k holding prompts k, K + k, 2K + k, ... (as `_prefill_fn` splits the rows), each chunk
    padded to the same buckets as a batch of its own (`pad_images`)."""
    merge = self.model_config.vision.spatial_merge_size ** 2
    patches_P = (np.asarray(input_ids_PT) == self.model_config.image_token_id).sum(axis=1) * merge
    grids_I3 = np.asarray(image_grid_thw_I3)
    grids_I3 = grids_I3[np.prod(grids_I3, axis=1) > 0]  # (0, 0, 0) rows pad the grid list
    sizes_I = np.prod(grids_I3, axis=1)
    starts_I = np.concatenate([[0], np.cumsum(sizes_I)])
    ends_P = np.cumsum(patches_P)
    # Prompt p's images are those whose patches end by its last patch, after the previous ones'.
    last_image_P = np.searchsorted(starts_I[1:], ends_P, side="right")
    if not np.array_equal(starts_I[last_image_P], ends_P):
      raise ValueError("The batch's image_grid_thw does not match its image tokens: each prompt's "
                       "image tokens must cover whole images (spatial_merge_size² patches each).")
    first_image_P = np.concatenate([[0], last_image_P[:-1]])
    pieces = []
    for k in range(chunks):
      prompts = range(k, len(patches_P), chunks)
      images = np.concatenate([np.arange(first_image_P[p], last_image_P[p]) for p in prompts])
      pixels = np.concatenate([pixel_values_XY[starts_I[i]:starts_I[i + 1]] for i in images] or
                              [np.zeros((0, pixel_values_XY.shape[1]), np.float32)])
      pieces.append((pixels, grids_I3[images.astype(int)]))
    _, num_patches, num_images = self.padded_sizes(
        1, max(p.shape[0] for p, _ in pieces), max(g.shape[0] for _, g in pieces))
    padded = [pad_images(p, g, num_patches, num_images) for p, g in pieces]
    return np.stack([p for p, _ in padded]), np.stack([g for _, g in padded])

  def padded_sizes(self, prompt_tokens: int, patches: int, images: int) -> tuple[int, int, int]:
    """The bucketed (prompt length, patch count, image count) of a batch with these maxima."""
    return (_bucket(prompt_tokens, self.config.min_prompt_bucket),
            _bucket(patches, self.config.min_patch_bucket), _bucket(images + 1, 2))

  def texts(self, processor, tokens_BN, lengths_B) -> list[str]:
    """Each row's completion as text: its first lengths_B[b] tokens less the stop tokens, decoded
    by `processor` with special tokens skipped."""
    tokens_BN, lengths_B = sharding_lib.to_host(tokens_BN), sharding_lib.to_host(lengths_B)
    stops = set(self.config.stop_token_ids)
    return [processor.decode([int(t) for t in row[:n] if int(t) not in stops],
                             skip_special_tokens=True) for row, n in zip(tokens_BN, lengths_B)]

  def programs(self) -> dict[str, Any]:
    """The jitted prefill and decode functions, for ahead-of-time lowering (metaphorstar_jax.plan)."""
    return {"prefill": self._prefill, "decode": self._decode}

  def decode_state(self, rows: int) -> dict[str, tuple[tuple[int, ...], Any, Any]]:
    """The decode loop's per-row state besides the prefill's outputs: name -> (shape, dtype,
    initial value)."""
    new = self.config.max_new_tokens
    state = dict(tokens=((rows, new), np.int32, self.pad_id),
                 logprobs=((rows, new), np.float32, 0.0), lengths=((rows,), np.int32, 0),
                 stopped=((rows,), bool, False), done=((rows,), bool, False))
    if self.config.return_entropy:
      state["entropy"] = ((rows, new), np.float32, 0.0)
    return state

  def __call__(self, batch: dict[str, np.ndarray], *, group_size: int = 1, key=None, state=None,
               max_new_tokens_per_row=None) -> Rollouts:
    """Samples `group_size` completions for each prompt of `batch`.

    Args:
      batch: the processor's output: input_ids and attention_mask (P, T), optional pixel_values
        (X, Y = 1176) and image_grid_thw (I, 3).
      group_size: G samples per prompt.
      key: a jax PRNG key (required unless greedy).
      state: model weights (an nnx.State like `nnx.split(model)[1]`); default: the model's, kept
        at construction (required with keep_weights=False). New weights do not recompile.
      max_new_tokens_per_row: optional (P·G,) budgets, each at most config.max_new_tokens.

    Returns:
      Rollouts with arrays of B = P·G rows and N = max_new_tokens columns.
    """
    return self.sample_prepared(self.prepare(batch), group_size=group_size, key=key, state=state,
                                max_new_tokens_per_row=max_new_tokens_per_row)

  def sample_prepared(self, prepared, *, group_size: int = 1, key=None, state=None,
                      max_new_tokens_per_row=None) -> Rollouts:
    """`__call__` on the output of `prepare` (which the trainer reuses to score the rollouts)."""
    cfg = self.config
    if key is None:
      if not cfg.greedy:
        raise ValueError("Sampling needs a PRNG key: pass key=jax.random.key(seed).")
      key = jax.random.key(0)
    if state is None:
      if self.state is None:
        raise ValueError("This sampler keeps no weights (keep_weights=False, as a trainer builds "
                         "it, since its updates donate them); pass the current ones as state=.")
      state = self.state
    ids, mask, pixels, grids = prepared
    num_prompts = ids.shape[0]
    rows, new = num_prompts * group_size, cfg.max_new_tokens
    chunks = cfg.prefill_chunks(num_prompts)
    if chunks > 1 and pixels is not None:
      pixels, grids = self.chunk_images(ids, pixels, grids, chunks)
    prefilled = self._prefill(state, self._place_rows(ids), self._place_rows(mask), pixels,
                              grids, group_size=group_size, new_tokens=new)
    budget = (np.full(rows, new, np.int32) if max_new_tokens_per_row is None
              else np.minimum(np.asarray(max_new_tokens_per_row, np.int32), new))
    carry = dict(prefilled, step=jnp.zeros((), jnp.int32),
                 **{name: self._place_rows(np.full(shape, value, dtype))
                    for name, (shape, dtype, value) in self.decode_state(rows).items()})
    out = self._decode(state, carry, key, self._place_rows(budget))
    lengths = out["lengths"]
    return Rollouts(
        tokens_BN=out["tokens"],
        mask_BN=(jnp.arange(new)[None, :] < lengths[:, None]).astype(jnp.int32),
        logprobs_BN=out["logprobs"],
        lengths_B=lengths,
        truncated_B=~out["stopped"],
        prompt_index_B=jnp.repeat(jnp.arange(num_prompts), group_size),
        entropy_BN=out.get("entropy"),
    )
