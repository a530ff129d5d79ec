"""Shared benchmark setup: the tiny/small random Qwen2.5-VL models and synthetic image+text batches.

Both sides of every benchmark (ours in JAX, the PyTorch reference in transformers) get the same
weights and the same inputs: the transformers model is built with a fixed torch seed, saved with
`save_pretrained`, and our model is loaded from that directory. Sizes follow
/work/shared/specs/bench_models.md so figures stay comparable across benchmarks and releases.

Shape letters (README "Shape letters"): B rows, T tokens, X patch rows, Y values per patch row,
I images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

IMAGE_SIDE = 112  # pixels; with the bounds below, 8×8 patches = 16 image tokens
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
DEFAULT_SEED = 0
MODEL_NAMES = ("tiny", "small")


def _special_ids() -> dict[str, int]:
  """Special ids of the benchmark vocabulary, shared by both sizes (Qwen's added tokens at 2000+k)."""
  from metaphorstar_jax.models import qwen2_5_vl
  cfg = qwen2_5_vl.preset("tiny")
  return {name: getattr(cfg, name) for name in (
      "pad_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
      "image_token_id")}


SPECIAL_IDS = _special_ids()


def _check_model_name(name: str) -> None:
  if name not in MODEL_NAMES:
    raise ValueError(f"Unknown benchmark model {name!r}; choose one of {list(MODEL_NAMES)}.")


def hf_config(name: str):
  """The transformers `Qwen2_5_VLConfig` of benchmark size `name` ('tiny' or 'small').

  Built from our preset of the same name, the single source of the bench_models.md sizes.
  """
  from transformers import Qwen2_5_VLConfig
  from metaphorstar_jax.models import qwen2_5_vl
  _check_model_name(name)
  return Qwen2_5_VLConfig(**qwen2_5_vl.to_hf_dict(qwen2_5_vl.preset(name)))


def build_hf_model(name: str, seed: int = DEFAULT_SEED):
  """A random fp32 `Qwen2_5_VLForConditionalGeneration` of size `name`, in eval mode."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  return Qwen2_5_VLForConditionalGeneration(hf_config(name)).float().eval()


def load_model_pair(name: str, seed: int = DEFAULT_SEED, directory: str | None = None):
  """(transformers model, our model) holding identical random weights.

  The transformers model is saved with `save_pretrained` to `directory` (a fresh temporary
  directory when None, removed afterwards) and our model is read back with
  `qwen2_5_vl.from_pretrained`.
  """
  from metaphorstar_jax.models import qwen2_5_vl
  hf_model = build_hf_model(name, seed)
  if directory is not None:
    hf_model.save_pretrained(directory)
    return hf_model, qwen2_5_vl.from_pretrained(directory)
  with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
    hf_model.save_pretrained(tmp)
    return hf_model, qwen2_5_vl.from_pretrained(tmp)


def num_parameters(hf_model) -> int:
  return sum(p.numel() for p in hf_model.parameters())


# ---------------------------------------------------------------------------------------------
# Synthetic true/false prompts about drawn shapes.

_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 220),
            "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
_SHAPES = ("circle", "square", "triangle")
_BACKGROUNDS = ((255, 255, 255), (235, 235, 225), (210, 225, 240))
_SIZE_WORDS = ("", "small ", "large ", "bright ")
_RELATIONS = ("above", "on top of", "higher up than")


def _draw(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
  x0, y0, x1, y1 = box
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  """One prompt: an image of two shapes and a statement about it that is true or false."""

  image: Any  # PIL.Image
  statement: str
  label: bool


def synthetic_examples(batch: int, seed: int = DEFAULT_SEED,
                       side: int = IMAGE_SIDE) -> list[SyntheticExample]:
  """`batch` images of two coloured shapes, one above the other, with a true/false statement."""
  from PIL import Image, ImageDraw
  rng = np.random.default_rng(seed)
  colours = list(_COLOURS)
  examples = []
  for _ in range(batch):
    image = Image.new("RGB", (side, side), _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))])
    draw = ImageDraw.Draw(image)
    picked = [(str(rng.choice(_SHAPES)), str(c))
              for c in rng.choice(colours, size=2, replace=False)]
    half = side // 2
    for (shape, colour), top in zip(picked, (0, half)):
      pad = int(rng.integers(4, 12))
      x0 = int(rng.integers(0, side - half))
      _draw(draw, shape, (x0 + pad, top + pad, x0 + half - pad, top + half - pad),
            _COLOURS[colour])
    # Optional size words make prompt lengths differ, so the batch really is left-padded.
    upper, lower = (f"{rng.choice(_SIZE_WORDS)}{colour} {shape}" for shape, colour in picked)
    label = bool(rng.integers(2))
    if not label:  # swap the relation so the statement is false
      upper, lower = lower, upper
    statement = f"The {upper} is {rng.choice(_RELATIONS)} the {lower}."
    examples.append(SyntheticExample(image=image, statement=statement, label=label))
  return examples


def conversation(example: SyntheticExample) -> list[dict]:
  """A one-turn chat: the image, then a true/false question about `example.statement`."""
  question = (f"Look at the picture carefully. Is the following statement true or false? "
              f"Statement: {example.statement} Think about the colours and positions of the "
              "shapes, then answer with one word, true or false.")
  return [{"role": "user", "content": [{"type": "image", "image": example.image},
                                       {"type": "text", "text": question}]}]


def chat_processor():
  """Our ChatProcessor over the 2048-vocab benchmark tokenizer with 56²..112² pixel bounds."""
  from metaphorstar_jax.data import ChatProcessor, ImageProcessor, build_small_tokenizer
  tokenizer = build_small_tokenizer()
  processor = ChatProcessor.from_tokenizer(
      tokenizer, ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
  ids = processor.special_tokens
  expected = (SPECIAL_IDS["pad_token_id"], SPECIAL_IDS["eos_token_id"],
              SPECIAL_IDS["vision_start_token_id"], SPECIAL_IDS["vision_end_token_id"],
              SPECIAL_IDS["image_token_id"])
  found = (ids.pad, ids.im_end, ids.vision_start, ids.vision_end, ids.image_pad)
  if found != expected:
    raise RuntimeError(f"The benchmark tokenizer's special ids {found} differ from the model's "
                       f"{expected}; the tokenizer recipe changed, update SPECIAL_IDS.")
  return processor


def synthetic_batch(batch: int, seed: int = DEFAULT_SEED, processor=None) -> dict[str, np.ndarray]:
  """A left-padded batch of `batch` one-image true/false prompts (~100 tokens each).

  Returns:
    {"input_ids": int32 (B, T), "attention_mask": int32 (B, T),
     "pixel_values": float32 (X, Y), "image_grid_thw": int32 (I, 3)}, I = B.
  """
  if batch < 1:
    raise ValueError(f"batch must be at least 1, got {batch}.")
  processor = processor or chat_processor()
  conversations = [conversation(e) for e in synthetic_examples(batch, seed)]
  return processor(conversations, add_generation_prompt=True, padding_side="left")


def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
  """Keyword arguments for the transformers forward, including `mm_token_type_ids`.

  transformers 5.x only takes the M-RoPE path when `mm_token_type_ids` marks the image tokens;
  without it the positions silently fall back to 1-D.
  """
  import torch
  input_ids = torch.from_numpy(np.asarray(inputs["input_ids"], np.int64))
  return dict(
      input_ids=input_ids,
      attention_mask=torch.from_numpy(np.asarray(inputs["attention_mask"], np.int64)),
      mm_token_type_ids=(input_ids == SPECIAL_IDS["image_token_id"]).int(),
      pixel_values=torch.from_numpy(np.asarray(inputs["pixel_values"], np.float32)),
      image_grid_thw=torch.from_numpy(np.asarray(inputs["image_grid_thw"], np.int64)),
  )


# ---------------------------------------------------------------------------------------------
# Reporting.

def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """Versions, device and core count, for the JSON line of every benchmark."""
  import jax
  import torch
  import transformers
  devices = jax.devices()
  kind = devices[0].device_kind if devices[0].platform != "cpu" else _cpu_name()
  return dict(
      jax_version=jax.__version__,
      torch_version=torch.__version__,
      transformers_version=transformers.__version__,
      device=f"{devices[0].platform} x{len(devices)} ({kind}, {os.cpu_count()} cores)",
      cpu_count=os.cpu_count(),
      torch_threads=torch.get_num_threads(),
  )


def _busy_cpu_seconds() -> float | None:
  """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()[1:]
  except OSError:
    return None
  user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
  """Measures how busy *other* processes kept the CPUs while the `with` block ran.

  `share` is their CPU seconds over (wall seconds × cores): 0 on an idle machine, 1 when they
  took every core; None where /proc/stat is unavailable. Timings taken with a share above ~0.1
  are not comparable between the two sides.
  """

  def __enter__(self):
    self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
    return self

  def __exit__(self, *exc):
    wall0, busy0, own0 = self._start
    wall, busy, own = time.perf_counter() - wall0, _busy_cpu_seconds(), _own_cpu_seconds()
    self.share = None
    if busy is not None and busy0 is not None and wall > 0:
      other = max(0.0, (busy - busy0) - (own - own0))
      self.share = other / (wall * (os.cpu_count() or 1))
    return False


def _own_cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system


def interleaved_medians(runs, repeats: int) -> list[float]:
  """Median wall seconds of each of `runs` (callables that block until done), timed in turns.

  Taking turns (a, b, a, b, ...) spreads any load from other processes over both sides alike.
  """
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, run_times in zip(runs, times):
      start = time.perf_counter()
      run()
      run_times.append(time.perf_counter() - start)
  return [statistics.median(run_times) for run_times in times]


def print_result(result: dict[str, Any]) -> None:
  """The benchmark's one line of JSON on stdout (logs go to stderr)."""
  sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
  sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# The transformers processor (for TRL and other PyTorch-side trainers).

def transformers_processor():
  """A transformers `Qwen2_5_VLProcessor` over the benchmark tokenizer and pixel bounds, offline.

  transformers 5.x's stock processor requires a video processor, whose class needs torchvision
  (not installed here). This builds an image-only subclass instead: `Qwen2VLImageProcessorPil`
  (instantiated directly: `AutoImageProcessor` fails offline on a hub-style config), the
  benchmark tokenizer saved by our `ChatProcessor.save_pretrained` and read back with
  `AutoTokenizer`, and no video processor at all. Its image outputs, token ids and
  `mm_token_type_ids` are the stock ones; asking it for videos raises.
  """
  from transformers import AutoTokenizer, Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.processing_utils import ProcessorMixin

  class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      # Qwen2_5_VLProcessor.__init__ hands a video processor to ProcessorMixin; skip that level.
      self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
      self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
      self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
      ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                              **kwargs)

  with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
    chat_processor().save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp, padding_side="left")
  image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template)
