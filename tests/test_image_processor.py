"""metaphorstar_jax.data.image_processor against transformers' Qwen2VLImageProcessorPil."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from metaphorstar_jax.data.image_processor import ImageProcessor, num_image_tokens, smart_resize

SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
TINY = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def _random_image(height, width, mode="RGB", seed=0):
  """A noise image of the given mode, which exercises every pixel of the resize and patchify."""
  rng = np.random.default_rng(seed)
  if mode == "RGB":
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  if mode == "RGBA":
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
  if mode == "L":
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
  if mode == "LA":
    return _random_image(height, width, "RGBA", seed).convert("LA")
  if mode == "P_transparent":
    image = _random_image(height, width, "RGB", seed).quantize(colors=16)
    image.info["transparency"] = 3  # palette entry 3 is see-through
    return image
  if mode == "I;16":
    return Image.fromarray(rng.integers(0, 600, (height, width), dtype=np.uint16))
  if mode == "CMYK":
    return _random_image(height, width, "RGB", seed).convert("CMYK")
  raise ValueError(mode)


CASES = [
  (230, 340, "RGB"),
  (100, 60, "RGB"),
  (56, 56, "RGB"),  # on the min_pixels bound
  (20, 30, "RGB"),  # below min_pixels: scaled up
  (500, 90, "RGB"),
  (1200, 40, "RGB"),  # tall
  (70, 42, "RGB"),  # 2.5 and 1.5 patches: banker's rounding
  (123, 321, "RGBA"),
  (150, 97, "L"),
  (90, 140, "LA"),
  (64, 200, "P_transparent"),
  (88, 77, "I;16"),
  (77, 88, "CMYK"),
]


@pytest.fixture(scope="module")
def reference():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  return lambda **bounds: Qwen2VLImageProcessorPil(**bounds)


@pytest.mark.parametrize("bounds", [SMALL, TINY], ids=["max1280tokens", "max112x112"])
@pytest.mark.parametrize("height,width,mode", CASES)
def test_matches_transformers(reference, bounds, height, width, mode):
  image = _random_image(height, width, mode, seed=height * 7 + width)
  ours = ImageProcessor(**bounds)([image])
  theirs = reference(**bounds)(images=[image], return_tensors="np")
  np.testing.assert_array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
  assert ours["pixel_values"].dtype == np.float32
  assert ours["pixel_values"].shape == theirs["pixel_values"].shape
  assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= 1e-5


def test_batch_matches_transformers(reference):
  images = [_random_image(h, w, m, seed=i) for i, (h, w, m) in enumerate(CASES[:6])]
  ours = ImageProcessor(**TINY)(images)
  theirs = reference(**TINY)(images=images, return_tensors="np")
  np.testing.assert_array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
  assert ours["image_grid_thw"].dtype == np.int32
  assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= 1e-5


def test_hub_defaults_match_transformers(reference):
  image = _random_image(230, 340)
  ours = ImageProcessor()([image])
  theirs = reference(min_pixels=3136, max_pixels=12845056)(images=[image], return_tensors="np")
  assert ImageProcessor().min_pixels == 3136 and ImageProcessor().max_pixels == 12845056
  np.testing.assert_array_equal(ours["image_grid_thw"], [[1, 16, 24]])
  assert np.abs(ours["pixel_values"] - theirs["pixel_values"]).max() <= 1e-5


def test_patch_order_is_merge_blocks_with_repeated_frame():
  # A frame whose value encodes (channel, row, col) lets us read back where each pixel went.
  processor = ImageProcessor(**TINY, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
  image = _random_image(112, 56)
  pixel_values_XY = processor([image])["pixel_values"]
  frame = np.asarray(image, np.float64).astype(np.float32) / 255  # (height, width, channels)
  p, m = 14, 2
  row_patches = pixel_values_XY.reshape(-1, 3, 2, p, p)
  # The still frame is repeated on the temporal axis, not zero-padded.
  np.testing.assert_array_equal(row_patches[:, :, 0], row_patches[:, :, 1])
  gw = 56 // p
  for x in range(pixel_values_XY.shape[0]):
    block, within = divmod(x, m * m)
    block_row, block_col = divmod(block, gw // m)
    patch_row = block_row * m + within // m
    patch_col = block_col * m + within % m
    patch = frame[patch_row * p : (patch_row + 1) * p, patch_col * p : (patch_col + 1) * p]
    channels_first = patch.transpose(2, 0, 1)
    np.testing.assert_allclose(row_patches[x, :, 0], channels_first, atol=1e-6)


def test_no_images():
  out = ImageProcessor()([])
  assert out["pixel_values"].shape == (0, 1176) and out["pixel_values"].dtype == np.float32
  assert out["image_grid_thw"].shape == (0, 3)


def test_smart_resize_examples():
  assert smart_resize(230, 340) == (224, 336)
  assert smart_resize(100, 60) == (112, 56)
  assert smart_resize(56, 56, min_pixels=56 * 56) == (56, 56)
  assert smart_resize(42, 70, min_pixels=1) == (56, 56)  # 1.5 -> 2 and 2.5 -> 2: banker's rounding
  assert smart_resize(1000, 1000, max_pixels=112 * 112) == (112, 112)


def test_smart_resize_refuses_extreme_aspect_ratio():
  with pytest.raises(ValueError, match="aspect ratio 201.0"):
    smart_resize(10, 2010)
  assert smart_resize(10, 2000)  # exactly 200 is allowed
  with pytest.raises(ValueError, match="at least 1x1"):
    smart_resize(0, 10)


@settings(max_examples=300, deadline=None)
@given(
  height=st.integers(1, 5000),
  width=st.integers(1, 5000),
  min_pixels=st.sampled_from([1, 56 * 56, 4 * 28 * 28, 112 * 112]),
  max_pixels=st.sampled_from([112 * 112, 28 * 28 * 1280, 16384 * 28 * 28]),
)
def test_smart_resize_matches_transformers(height, width, min_pixels, max_pixels):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

  try:
    expected = reference(height, width, 28, min_pixels, max_pixels)
  except ValueError:
    with pytest.raises(ValueError):
      smart_resize(height, width, 28, min_pixels, max_pixels)
    return
  assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_num_image_tokens():
  assert num_image_tokens([1, 16, 24], 2) == 96
  assert num_image_tokens(np.array([2, 8, 8]), 2) == 32
  assert ImageProcessor(**TINY).grid_thw(112, 112) == (1, 8, 8)


def test_unreadable_file_is_named(tmp_path):
  buffer = io.BytesIO()
  _random_image(64, 64).save(buffer, format="PNG")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(buffer.getvalue()[:200])
  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("hello")
  for path in (truncated, not_an_image, tmp_path / "missing.png"):
    with pytest.raises(ValueError, match=f"image 1 .*{path.name}"):
      ImageProcessor()([_random_image(56, 56), path])


def test_corrupt_pil_image_is_named():
  buffer = io.BytesIO()
  _random_image(64, 64).save(buffer, format="JPEG")
  data = buffer.getvalue()
  lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # the header parses; pixels decode later
  with pytest.raises(ValueError, match="image 0 .*truncated or corrupt"):
    ImageProcessor()([lazy])
  with pytest.raises(TypeError, match="image 0.*ndarray"):
    ImageProcessor()([np.zeros((4, 4, 3), np.uint8)])
  with pytest.raises(TypeError, match="list of images"):
    ImageProcessor()(_random_image(56, 56))
  with pytest.raises(ValueError, match="image 0.*aspect ratio"):
    ImageProcessor()([_random_image(1, 300)])


def test_file_path_input_matches_pil(tmp_path):
  path = tmp_path / "a.png"
  image = _random_image(90, 130)
  image.save(path)
  from_path, from_pil = ImageProcessor()([path]), ImageProcessor()([image])
  np.testing.assert_array_equal(from_path["pixel_values"], from_pil["pixel_values"])


def test_from_pretrained_reads_hub_and_size_keys(tmp_path):
  hub = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2, "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 0.00392156862745098,
         "image_processor_type": "Qwen2_5_VLImageProcessor", "do_convert_rgb": True}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
  assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()
  (tmp_path / "preprocessor_config.json").write_text(
    json.dumps({"size": {"shortest_edge": 100, "longest_edge": 20000}, "merge_size": 2}))
  loaded = ImageProcessor.from_pretrained(tmp_path)
  assert (loaded.min_pixels, loaded.max_pixels) == (100, 20000)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
  with pytest.raises(ValueError, match="do_normalize"):
    ImageProcessor.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    ImageProcessor.from_pretrained(tmp_path / "nowhere")


def test_saved_config_loads_in_transformers(tmp_path):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  ours = ImageProcessor(**TINY)
  ours.save_pretrained(tmp_path)
  assert ImageProcessor.from_pretrained(tmp_path) == ours
  theirs = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
  image = _random_image(300, 200)
  expected = theirs(images=[image], return_tensors="np")
  np.testing.assert_array_equal(expected["image_grid_thw"], [[1, 8, 6]])
  assert np.abs(expected["pixel_values"] - ours([image])["pixel_values"]).max() <= 1e-5


def test_invalid_settings_are_refused():
  with pytest.raises(ValueError, match="min_pixels .*larger than max_pixels"):
    ImageProcessor(min_pixels=20000, max_pixels=10000)
  with pytest.raises(ValueError, match="one value per RGB channel"):
    ImageProcessor(image_mean=(0.5,))
