"""Index arithmetic of Qwen2.5-VL as pure jnp functions: 3-D M-RoPE ids and the ViT window layout.

Both are computed from `image_grid_thw` with static shapes only, so they run inside `jax.jit` with
the grid as a traced array; the number of patches X and of tokens T are the only static sizes.

Shape letters (README "Shape letters"): B rows, T tokens, I images, X patches, C merged cells
(X / merge²).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


def _exclusive_cumsum(x, axis=-1):
  return jnp.cumsum(x, axis=axis) - x


class _GridItems(NamedTuple):
  """Per-element decomposition of a packed sequence of merged cells into (image, frame, row, col)."""

  image: jnp.ndarray  # which grid row the element belongs to
  frame: jnp.ndarray
  row: jnp.ndarray  # merged-grid row within the frame
  col: jnp.ndarray
  last_of_image: jnp.ndarray  # True on the image's final element


def _locate_cells(global_index, grid_thw_I3, merge_size):
  """Maps indices into the concatenation of all images' merged cells to their grid coordinates."""
  t, h, w = (grid_thw_I3[:, i].astype(jnp.int32) for i in range(3))
  lh, lw = h // merge_size, w // merge_size
  cells = t * lh * lw
  ends = jnp.cumsum(cells)
  image = jnp.searchsorted(ends, global_index, side="right")
  image = jnp.clip(image, 0, grid_thw_I3.shape[0] - 1)
  local = global_index - (ends - cells)[image]
  frame_cells = (lh * lw)[image]
  in_frame = local % frame_cells
  return _GridItems(image=image, frame=local // frame_cells, row=in_frame // lw[image],
                    col=in_frame % lw[image], last_of_image=local == cells[image] - 1)


def rope_index(input_ids_BT, attention_mask_BT, image_grid_thw_I3, *, image_token_id,
               merge_size):
  """3-D (temporal, height, width) position ids of transformers' `get_rope_index`, for images.

  Text tokens advance a running position by one. The n = h·w/merge² pad tokens of an image take
  (cur, cur + row, cur + col) over its merged grid, after which `cur` advances by max(rows, cols).
  Padded slots (attention_mask 0) get 0, as in transformers 5.x.

  Args:
    input_ids_BT: token ids.
    attention_mask_BT: 1 for real tokens, 0 for padding (either side).
    image_grid_thw_I3: one (t, h, w) row per image in batch-row-major order, or None.
    image_token_id: id of `<|image_pad|>`.
    merge_size: spatial merge size of the ViT (2).

  Returns:
    position_ids_3BT: int32 ids per axis.
    rope_deltas_B: max position + 1 − number of real tokens; decode token at cache index c gets
      position c + delta.
  """
  input_ids_BT = jnp.asarray(input_ids_BT)
  B, T = input_ids_BT.shape
  valid_BT = (jnp.ones((B, T), jnp.int32) if attention_mask_BT is None
              else jnp.asarray(attention_mask_BT).astype(jnp.int32)) > 0
  is_image_BT = (input_ids_BT == image_token_id) & valid_BT
  step_BT = valid_BT.astype(jnp.int32)
  row_BT = col_BT = frame_BT = jnp.zeros((B, T), jnp.int32)
  if image_grid_thw_I3 is not None and image_grid_thw_I3.shape[0] > 0:
    grid = jnp.asarray(image_grid_thw_I3)
    # Image tokens are numbered across the batch in row-major order, like masked_scatter.
    flat_index = jnp.cumsum(is_image_BT.reshape(-1)) - 1
    items = _locate_cells(flat_index.reshape(B, T), grid, merge_size)
    lh, lw = grid[:, 1] // merge_size, grid[:, 2] // merge_size
    advance = jnp.maximum(lh, lw)[items.image]
    # Inside an image the position stays; its last token carries the advance of the whole block.
    step_BT = jnp.where(is_image_BT, jnp.where(items.last_of_image, advance, 0), step_BT)
    row_BT = jnp.where(is_image_BT, items.row, 0)
    col_BT = jnp.where(is_image_BT, items.col, 0)
    frame_BT = jnp.where(is_image_BT, items.frame, 0)
  cur_BT = _exclusive_cumsum(step_BT, axis=1)
  position_ids_3BT = jnp.stack([cur_BT + frame_BT, cur_BT + row_BT, cur_BT + col_BT])
  position_ids_3BT = jnp.where(valid_BT[None], position_ids_3BT, 0).astype(jnp.int32)
  max_pos_B = jnp.max(jnp.where(valid_BT[None], position_ids_3BT, -1), axis=(0, 2))
  rope_deltas_B = max_pos_B + 1 - valid_BT.sum(axis=1)
  return position_ids_3BT, rope_deltas_B.astype(jnp.int32)


def decode_positions(real_tokens_B, rope_deltas_B):
  """3-D position ids (3, B, 1) of a new token that follows `real_tokens_B` non-padding tokens.

  Equals transformers' `(cumsum(attention_mask) - 1) + rope_delta` at that token, so left padding
  does not shift it; the first generated token lands at the prompt's max position + 1.
  """
  pos_B = (real_tokens_B + rope_deltas_B).astype(jnp.int32)
  return jnp.broadcast_to(pos_B[None, :, None], (3, pos_B.shape[0], 1))


class VisionLayout(NamedTuple):
  """Where every patch goes inside the ViT, derived from the grids alone.

  window_index_C: merged cells in window order (a permutation of range(C)).
  reverse_index_C: its inverse, restoring raster order after the merger.
  rope_rows_X, rope_cols_X: patch row/column within its frame, in window order.
  window_segments_X: id of the attention window of each patch, in window order.
  frame_segments_X: id of the frame of each patch (full-attention blocks), in window order.
  """

  window_index_C: jnp.ndarray
  reverse_index_C: jnp.ndarray
  rope_rows_X: jnp.ndarray
  rope_cols_X: jnp.ndarray
  window_segments_X: jnp.ndarray
  frame_segments_X: jnp.ndarray


def vision_layout(image_grid_thw_I3, num_patches, *, merge_size, window_cells):
  """Window permutation, attention segments and rope positions for a packed batch of images.

  Args:
    image_grid_thw_I3: (t, h, w) per image in patches, before merging.
    num_patches: X, the number of rows of `pixel_values` (static).
    merge_size: spatial merge size (2).
    window_cells: window side in merged cells (window_size / merge_size / patch_size = 4).

  Returns:
    VisionLayout.
  """
  grid = jnp.asarray(image_grid_thw_I3).astype(jnp.int32)
  unit = merge_size * merge_size
  num_cells = num_patches // unit
  items = _locate_cells(jnp.arange(num_cells), grid, merge_size)
  t, lh, lw = grid[:, 0], grid[:, 1] // merge_size, grid[:, 2] // merge_size
  win_rows, win_cols = -(-lh // window_cells), -(-lw // window_cells)
  windows_per_frame = win_rows * win_cols
  window_offset = _exclusive_cumsum(t * windows_per_frame)
  frame_offset = _exclusive_cumsum(t)
  img = items.image
  window_of_cell = (window_offset[img] + items.frame * windows_per_frame[img]
                    + (items.row // window_cells) * win_cols[img] + items.col // window_cells)
  # Cells are already raster-ordered per frame, so a stable sort by window keeps raster order
  # inside each window, which is how transformers walks a window.
  window_index = jnp.argsort(window_of_cell, stable=True).astype(jnp.int32)
  reverse_index = jnp.argsort(window_index).astype(jnp.int32)

  def per_patch(cell_values):
    return jnp.repeat(cell_values[window_index], unit)

  within = jnp.arange(unit)
  rows = (items.row[:, None] * merge_size + within[None, :] // merge_size)[window_index]
  cols = (items.col[:, None] * merge_size + within[None, :] % merge_size)[window_index]
  return VisionLayout(
      window_index_C=window_index,
      reverse_index_C=reverse_index,
      rope_rows_X=rows.reshape(-1),
      rope_cols_X=cols.reshape(-1),
      window_segments_X=per_patch(window_of_cell),
      frame_segments_X=per_patch(frame_offset[img] + items.frame),
  )
