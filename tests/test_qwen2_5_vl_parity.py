"""Our Qwen2.5-VL against transformers on tiny random models: logits, vision features, positions."""

import numpy as np
import pytest
import torch

from hf_reference import IMAGE_PAD, hf_forward, random_pixels, sample_ids
from metaphorstar_jax.models import qwen2_5_vl

CONFIGS = ["a", "b"]
_loaded = {}


def ours(hf_tiny, name):
  if name not in _loaded:
    _loaded[name] = qwen2_5_vl.from_pretrained(hf_tiny(name)[1])
  return _loaded[name]


def run_both(hf_tiny, name, ids_BT, mask_BT, grids=None, seed=0):
  rng = np.random.default_rng(seed)
  pixels = random_pixels(rng, grids) if grids else None
  grid_arr = np.asarray(grids, np.int32) if grids else None
  ref = hf_forward(hf_tiny(name)[0], ids_BT, mask_BT, pixels, grids)
  got = np.asarray(ours(hf_tiny, name)(np.asarray(ids_BT), attention_mask=np.asarray(mask_BT),
                                       pixel_values=pixels, image_grid_thw=grid_arr))
  return ref, got


@pytest.mark.parametrize("name", CONFIGS)
def test_text_only_logits(hf_tiny, name):
  ids = sample_ids(np.random.default_rng(1), [37])
  ref, got = run_both(hf_tiny, name, [ids], [[1] * len(ids)])
  assert got.shape == ref.shape
  assert np.abs(ref - got).max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_one_image_logits(hf_tiny, name):
  grids = [[1, 16, 24]]
  ids = sample_ids(np.random.default_rng(2), [15, ("image", 96), 9])
  ref, got = run_both(hf_tiny, name, [ids], [[1] * len(ids)], grids)
  assert np.abs(ref - got).max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_two_images_of_different_shapes_logits(hf_tiny, name):
  grids = [[1, 12, 20], [1, 22, 6]]  # wide, then tall with partial windows
  ids = sample_ids(np.random.default_rng(3), [6, ("image", 60), 4, ("image", 33), 7])
  ref, got = run_both(hf_tiny, name, [ids], [[1] * len(ids)], grids)
  assert np.abs(ref - got).max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits(hf_tiny, name, side):
  rng = np.random.default_rng(4)
  rows = [sample_ids(rng, [5, ("image", 24), 3, ("image", 16), 4]), sample_ids(rng, [9])]
  grids = [[1, 8, 12], [1, 8, 8]]
  T = max(map(len, rows))
  ids = np.zeros((2, T), np.int64)
  mask = np.zeros((2, T), np.int64)
  for b, row in enumerate(rows):
    span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
    ids[b, span], mask[b, span] = row, 1
  ref, got = run_both(hf_tiny, name, ids, mask, grids)
  valid = mask.astype(bool)
  assert np.abs(ref[valid] - got[valid]).max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_vision_tower_features(hf_tiny, name):
  hf_model = hf_tiny(name)[0]
  grids = [[1, 16, 24], [1, 6, 10], [1, 2, 2], [1, 18, 18]]
  pixels = random_pixels(np.random.default_rng(5), grids)
  with torch.no_grad():
    ref = hf_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).pooler_output
  got = ours(hf_tiny, name).visual(pixels, np.asarray(grids))
  assert got.shape == tuple(ref.shape)
  assert np.abs(ref.numpy() - np.asarray(got)).max() <= 1e-5


def hf_rope_index(hf_model, ids, mask, grids):
  ids_t = torch.tensor(ids)
  pos, deltas = hf_model.model.get_rope_index(
      ids_t, mm_token_type_ids=(ids_t == IMAGE_PAD).int(),
      image_grid_thw=torch.tensor(grids) if grids else None,
      attention_mask=torch.tensor(mask))
  return pos.numpy(), deltas.numpy().reshape(-1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_position_ids_identical(hf_tiny, side):
  hf_model = hf_tiny("a")[0]
  rng = np.random.default_rng(6)
  rows = [sample_ids(rng, [15, ("image", 96), 9]),
          sample_ids(rng, [3, ("image", 6), 2, ("image", 30), 2, ("image", 1), 5]),
          sample_ids(rng, [11])]
  grids = [[1, 16, 24], [1, 2, 12], [1, 10, 12], [1, 2, 2]]
  T = max(map(len, rows)) + 2
  ids = np.zeros((3, T), np.int64)
  mask = np.zeros((3, T), np.int64)
  for b, row in enumerate(rows):
    span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
    ids[b, span], mask[b, span] = row, 1
  ref_pos, ref_deltas = hf_rope_index(hf_model, ids, mask, grids)
  got_pos, got_deltas = qwen2_5_vl.rope_index(ids, mask, np.asarray(grids), image_token_id=IMAGE_PAD,
                                              merge_size=2)
  np.testing.assert_array_equal(np.asarray(got_pos), ref_pos)
  np.testing.assert_array_equal(np.asarray(got_deltas), ref_deltas)


def test_position_ids_spec_example():
  """The worked example of the spec: 15 text tokens, a 16×24 grid, rope_delta −84."""
  ids = sample_ids(np.random.default_rng(7), [15, ("image", 96), 9])
  pos, deltas = qwen2_5_vl.rope_index(np.asarray([ids]), None, np.asarray([[1, 16, 24]]),
                                      image_token_id=IMAGE_PAD, merge_size=2)
  pos = np.asarray(pos)[:, 0]
  assert (pos[:, 14] == 14).all()
  np.testing.assert_array_equal(pos[0, 16:112], 16)  # image tokens sit after vision_start (15)
  assert pos[1, 16:112].min() == 16 and pos[1, 16:112].max() == 23
  assert pos[2, 16:112].min() == 16 and pos[2, 16:112].max() == 27
  assert (pos[:, 112] == 28).all()  # vision_end: 16 + max(8, 12)
  assert int(deltas[0]) == pos.max() + 1 - len(ids)


def test_decode_positions_continue_prompt():
  ids = sample_ids(np.random.default_rng(8), [4, ("image", 24), 3])
  pos, deltas = qwen2_5_vl.rope_index(np.asarray([ids]), None, np.asarray([[1, 8, 12]]),
                                      image_token_id=IMAGE_PAD, merge_size=2)
  nxt = qwen2_5_vl.decode_positions(np.asarray([len(ids)]), deltas)
  assert np.asarray(nxt).shape == (3, 1, 1)
  assert (np.asarray(nxt) == np.asarray(pos).max() + 1).all()


def test_image_token_count_mismatch_is_a_clear_error(hf_tiny):
  model = ours(hf_tiny, "a")
  ids = sample_ids(np.random.default_rng(9), [3, ("image", 23), 3])  # grid gives 24 features
  with pytest.raises(ValueError, match="23 image-pad tokens.*24 features"):
    model(np.asarray([ids]), pixel_values=random_pixels(np.random.default_rng(0), [[1, 8, 12]]),
          image_grid_thw=np.asarray([[1, 8, 12]]))


@pytest.mark.parametrize("window_size", [112, 56])
def test_vision_layout_matches_transformers(window_size):
  """Window order, window boundaries and patch rope positions, item by item.

  Our attention masks by segment id, so the window order cannot change features; this pins it for
  kernels that need contiguous windows.
  """
  from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
  grids = [[1, 16, 24], [1, 6, 10], [1, 2, 2], [1, 18, 18], [2, 4, 8]]
  window_index, cu_window_seqlens = get_vision_window_index(
      torch.tensor(grids), spatial_merge_size=2, window_size=window_size, patch_size=14)
  positions = get_vision_position_ids(torch.tensor(grids), 2)
  num_patches = sum(int(np.prod(g)) for g in grids)
  layout = qwen2_5_vl.vision_layout(np.asarray(grids), num_patches, merge_size=2,
                                    window_cells=window_size // 28)
  np.testing.assert_array_equal(np.asarray(layout.window_index_C), window_index.numpy())
  segments = np.asarray(layout.window_segments_X)
  boundaries = np.flatnonzero(np.diff(segments)) + 1
  expected = np.unique(cu_window_seqlens.numpy())[1:-1]
  np.testing.assert_array_equal(boundaries, expected)
  by_window = positions.numpy().reshape(-1, 4, 2)[window_index.numpy()].reshape(-1, 2)
  np.testing.assert_array_equal(np.asarray(layout.rope_rows_X), by_window[:, 0])
  np.testing.assert_array_equal(np.asarray(layout.rope_cols_X), by_window[:, 1])
