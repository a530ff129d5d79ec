"""Qwen2-VL / Qwen2.5-VL image preprocessing in NumPy and PIL.

Turns PIL images into the flat patch rows the vision tower eats, matching transformers'
`Qwen2VLImageProcessorPil` (see specs/qwen2_5_vl.md §5):

  convert to RGB (alpha composited on white) -> smart_resize -> bicubic PIL resize
  -> (x/255 - mean)/std -> patchify in merge-block order, the frame repeated Tp times.

Shape letters (README "Shape letters"): I images, X patch rows over all images, Y values per patch
row (channels · temporal_patch_size · patch_size², 1176 for Qwen); a frame's pixel axes are
spelled out (channels, height, width), since the legend has no letters for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# The values of the hub `preprocessor_config.json`, shared by all Qwen2.5-VL sizes.
HUB_MIN_PIXELS = 56 * 56
HUB_MAX_PIXELS = 16384 * 28 * 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
PREPROCESSOR_CONFIG = "preprocessor_config.json"

ImageSource = Image.Image | str | os.PathLike


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = HUB_MIN_PIXELS,
  max_pixels: int = HUB_MAX_PIXELS,
) -> tuple[int, int]:
  """Target (height, width) for an image: multiples of `factor`, area within bounds.

  Rounds each side to the nearest multiple of `factor` (Python's banker's rounding), then
  scales both sides by one factor if the area leaves [min_pixels, max_pixels].

  Args:
    height, width: input size in pixels, both >= 1.
    factor: patch side times merge size (28 for Qwen2.5-VL).
    min_pixels, max_pixels: bounds on the resized area.

  Returns:
    (resized_height, resized_width), both multiples of `factor`.
  """
  if height < 1 or width < 1:
    raise ValueError(f"Image size must be at least 1x1 pixels, got height={height}, width={width}.")
  aspect_ratio = max(height, width) / min(height, width)
  if aspect_ratio > MAX_ASPECT_RATIO:
    raise ValueError(
      f"Image of {height}x{width} (HxW) has aspect ratio {aspect_ratio:.1f}, above the limit of "
      f"{MAX_ASPECT_RATIO}; crop or pad it first."
    )
  resized_height = round(height / factor) * factor
  resized_width = round(width / factor) * factor
  if resized_height * resized_width > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    resized_height = max(factor, math.floor(height / beta / factor) * factor)
    resized_width = max(factor, math.floor(width / beta / factor) * factor)
  elif resized_height * resized_width < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    resized_height = math.ceil(height * beta / factor) * factor
    resized_width = math.ceil(width * beta / factor) * factor
  return resized_height, resized_width


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = 2) -> int:
  """Number of LLM placeholder tokens for one image or video: t*h*w / merge_size**2.

  Args:
    grid_thw: (3,) patch grid [t, h, w] of one image, as in a row of `image_grid_thw`.
    merge_size: side of the square of patches the merger folds into one token.
  """
  t, h, w = (int(v) for v in grid_thw)
  return t * h * w // (merge_size * merge_size)


def _describe(image: Any, index: int) -> str:
  """A short name for an image in error messages: its path if known, else its position."""
  if isinstance(image, (str, os.PathLike)):
    return f"image {index} ({os.fspath(image)!r})"
  filename = getattr(image, "filename", "")
  return f"image {index} ({filename!r})" if filename else f"image {index}"


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB copy of `image`; transparency is composited on white, as transformers does."""
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if not has_alpha:
    # Note: PIL clips 16-bit and float modes to [0, 255] here; transformers does the same.
    return image.convert("RGB")
  rgba = image.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def _load_rgb(image: Any, index: int) -> Image.Image:
  """Opens (if a path) and decodes one image to RGB, with errors that name the image."""
  name = _describe(image, index)
  if isinstance(image, (str, os.PathLike)):
    try:
      with Image.open(image) as opened:
        return _to_rgb(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
      raise ValueError(f"Could not read {name}: {error}") from error
  if not isinstance(image, Image.Image):
    raise TypeError(f"Expected a PIL image or a file path for {name}, got {type(image).__name__}.")
  try:
    return _to_rgb(image)
  except (OSError, ValueError, SyntaxError) as error:
    raise ValueError(
      f"Could not decode {name} (mode {image.mode}, size {image.size}): {error}. "
      "The file may be truncated or corrupt."
    ) from error


def _patchify(
  frame: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> np.ndarray:
  """(channels, height, width) normalised frame -> (X, Y) rows in merge-block order: X = gh*gw
  patches, Y = channels * temporal_patch_size * patch_size² values each.

  Consecutive groups of merge_size² rows are spatial merge_size x merge_size neighbourhoods,
  because the merger folds consecutive rows into one LLM token. Within a row the order is
  c, t, y, x (the Conv3d weight layout), with the still frame repeated temporal_patch_size times.
  """
  channels, height, width = frame.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  blocks_h, blocks_w = grid_h // merge_size, grid_w // merge_size
  blocks = frame.reshape(
    channels, blocks_h, merge_size, patch_size, blocks_w, merge_size, patch_size
  )
  # (c, bh, mh, py, bw, mw, px) -> (bh, bw, mh, mw, c, py, px)
  blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
  blocks = np.repeat(blocks[:, :, :, :, :, None], temporal_patch_size, axis=5)
  return blocks.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Qwen2.5-VL image preprocessing; defaults are the hub `preprocessor_config.json`.

  Call it on a list of images (PIL images or file paths) to get the model's `pixel_values`
  and `image_grid_thw`.
  """

  min_pixels: int = HUB_MIN_PIXELS
  max_pixels: int = HUB_MAX_PIXELS
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  resample: Image.Resampling = Image.Resampling.BICUBIC

  def __post_init__(self):
    for field in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"ImageProcessor.{field} must be positive, got {getattr(self, field)}.")
    if self.min_pixels > self.max_pixels:
      raise ValueError(
        f"ImageProcessor.min_pixels ({self.min_pixels}) is larger than "
        f"max_pixels ({self.max_pixels})."
      )
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError(
        "image_mean and image_std need one value per RGB channel, "
        f"got {self.image_mean} and {self.image_std}."
      )
    # Normalise list-valued fields (e.g. from JSON) so the dataclass stays hashable.
    object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
    object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
    object.__setattr__(self, "resample", Image.Resampling(self.resample))

  @property
  def factor(self) -> int:
    """Pixel side of one LLM token: patch_size * merge_size."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Y, the length of one row of `pixel_values`: 3 · temporal_patch_size · patch_size²."""
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

  def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
    """Patch grid (1, gh, gw) an image of height x width pixels will get, without pixels."""
    resized_height, resized_width = smart_resize(
      height, width, self.factor, self.min_pixels, self.max_pixels
    )
    return 1, resized_height // self.patch_size, resized_width // self.patch_size

  def process_image(self, image: ImageSource, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Preprocesses one image.

    Args:
      image: a PIL image (any mode) or a path to an image file.
      index: position of the image in its batch, used in error messages.

    Returns:
      pixel_values_XY: float32 (X = gh*gw, Y) patch rows.
      grid_thw: int32 (3,) = [1, gh, gw].
    """
    rgb = _load_rgb(image, index)
    width, height = rgb.size
    try:
      _, grid_h, grid_w = self.grid_thw(height, width)
    except ValueError as error:
      raise ValueError(f"Cannot resize {_describe(image, index)}: {error}") from error
    resized_size = (grid_w * self.patch_size, grid_h * self.patch_size)  # PIL wants (W, H)
    resized = rgb.resize(resized_size, resample=self.resample)
    # float64 scale, then float32 normalise: transformers' arithmetic, so values match bit for bit.
    # (height, width, channels), as PIL lays the pixels out.
    scaled = (np.asarray(resized, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(self.image_mean, dtype=np.float32)
    std = np.asarray(self.image_std, dtype=np.float32)
    channels_first = ((scaled - mean) / std).transpose(2, 0, 1)
    pixel_values_XY = _patchify(
      channels_first, self.patch_size, self.merge_size, self.temporal_patch_size
    )
    return pixel_values_XY, np.array([1, grid_h, grid_w], dtype=np.int32)

  def __call__(self, images: Sequence[ImageSource]) -> dict[str, np.ndarray]:
    """Preprocesses a list of images into one batch.

    Args:
      images: I PIL images or image file paths.

    Returns:
      {"pixel_values": float32 (X, Y), rows of all images concatenated in order,
       "image_grid_thw": int32 (I, 3), one [1, gh, gw] row per image}.
      With no images: shapes (0, Y) and (0, 3).
    """
    if isinstance(images, (Image.Image, str, os.PathLike)):
      raise TypeError("ImageProcessor takes a list of images; wrap a single image as [image].")
    pixel_rows, grids = [np.zeros((0, self.patch_dim), np.float32)], [np.zeros((0, 3), np.int32)]
    for index, image in enumerate(images):
      pixel_values_XY, grid_thw = self.process_image(image, index)
      pixel_rows.append(pixel_values_XY)
      grids.append(grid_thw[None])
    return {"pixel_values": np.concatenate(pixel_rows), "image_grid_thw": np.concatenate(grids)}

  def to_config(self) -> dict[str, Any]:
    """The hub-style `preprocessor_config.json` contents for these settings."""
    return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "do_convert_rgb": True,
      "do_resize": True,
      "do_rescale": True,
      "do_normalize": True,
      "rescale_factor": 1.0 / 255.0,
      "min_pixels": self.min_pixels,
      "max_pixels": self.max_pixels,
      "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
      "patch_size": self.patch_size,
      "temporal_patch_size": self.temporal_patch_size,
      "merge_size": self.merge_size,
      "image_mean": list(self.image_mean),
      "image_std": list(self.image_std),
      "resample": int(self.resample),
    }

  def save_pretrained(self, directory: str | os.PathLike) -> str:
    """Writes `preprocessor_config.json` into `directory` (created if needed); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_config(), f, indent=2)
    return path

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> ImageProcessor:
    """Settings from a parsed `preprocessor_config.json`; missing keys take the hub defaults.

    Top-level min_pixels / max_pixels win over size.shortest_edge / size.longest_edge, as in
    transformers. Configs that turn off RGB conversion, resizing, rescaling or normalisation
    are refused, since this processor always does all four.
    """
    for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
      if config.get(flag, True) is False:
        raise ValueError(
          f"preprocessor config sets {flag}=false, which ImageProcessor does not support."
        )
    rescale_factor = config.get("rescale_factor", 1.0 / 255.0)
    if not math.isclose(rescale_factor, 1.0 / 255.0, rel_tol=1e-6):
      raise ValueError(
        f"preprocessor config has rescale_factor={rescale_factor}; only 1/255 is supported."
      )
    size = config.get("size") or {}
    min_pixels = config.get("min_pixels", size.get("shortest_edge", HUB_MIN_PIXELS))
    max_pixels = config.get("max_pixels", size.get("longest_edge", HUB_MAX_PIXELS))
    optional = (
      "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample"
    )
    kwargs = {name: config[name] for name in optional if config.get(name) is not None}
    return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), **kwargs)

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
    """Reads `preprocessor_config.json` from a local checkpoint directory."""
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"No {PREPROCESSOR_CONFIG} in {os.fspath(directory)!r}. Pass a checkpoint directory that "
        "holds one, or build ImageProcessor(...) directly."
      )
    with open(path, encoding="utf-8") as f:
      try:
        config = json.load(f)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return cls.from_config(config)
