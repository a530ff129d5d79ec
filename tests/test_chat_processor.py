"""metaphorstar_jax.data.chat_template and processor: the chat template and batched model inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metaphorstar_jax.data import (
  CHAT_TEMPLATE,
  ChatProcessor,
  ImageProcessor,
  build_small_tokenizer,
  render_chat,
)

TINY = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def _image(height, width, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jinja(messages, add_generation_prompt, add_vision_id=False):
  """The spec's jinja template, rendered the way transformers renders chat templates."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  return env.from_string(CHAT_TEMPLATE).render(
    messages=messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)


A, B, C = _image(230, 340, 0), _image(100, 60, 1), _image(300, 90, 2)

CONVERSATIONS = {
  "string": [{"role": "user", "content": "Is the sky green?"}],
  "one_image": [{"role": "user", "content": [{"type": "image", "image": A},
                                             {"type": "text", "text": "What is it?"}]}],
  "system_first": [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                 {"type": "image", "image": A},
                                 {"type": "text", "text": " and "},
                                 {"type": "image", "image": B}]},
  ],
  "multi_turn": [
    {"role": "user", "content": [{"image": A}, {"type": "text", "text": "Describe."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A square.\nMaybe."}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": B},
                                 {"type": "text", "text": "And this?"}]},
  ],
  "empty_and_unicode": [{"role": "user", "content": [{"type": "text", "text": ""},
                                                     {"type": "text", "text": "héllo 世界 🙂"}]}],
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_jinja(name, add_generation_prompt, add_vision_id):
  messages = CONVERSATIONS[name]
  text, images = render_chat(messages, add_generation_prompt, add_vision_id)
  assert text == _jinja(messages, add_generation_prompt, add_vision_id)
  expected_images = [item.get("image", item.get("image_url"))
                     for m in messages if not isinstance(m["content"], str)
                     for item in m["content"] if "image" in item or "image_url" in item]
  assert len(images) == len(expected_images)
  assert all(a is b for a, b in zip(images, expected_images))


def test_render_layout():
  text, images = render_chat(CONVERSATIONS["one_image"])
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                  "What is it?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  assert images == [A]


def test_render_errors():
  with pytest.raises(NotImplementedError, match="video"):
    render_chat([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])
  with pytest.raises(ValueError, match="neither text nor image"):
    render_chat([{"role": "user", "content": [{"type": "audio"}]}])
  with pytest.raises(ValueError, match="Message 0 must be a dict"):
    render_chat([{"content": "no role"}])
  with pytest.raises(TypeError, match="list of"):
    render_chat({"role": "user", "content": "not wrapped"})


@pytest.fixture(scope="module")
def processor():
  return ChatProcessor.from_tokenizer(build_small_tokenizer(), ImageProcessor(**TINY))


def _batch():
  """Three rows with 0, 1 and 2 images of different sizes."""
  return [
    [{"role": "user", "content": "Is a circle round? Answer true or false."}],
    [{"role": "user", "content": [{"type": "image", "image": A},
                                  {"type": "text", "text": "What does it imply?"}]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image", "image": B}, {"type": "text", "text": "versus"},
                                  {"type": "image", "image": C}]}],
  ]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch(processor, padding_side):
  out = processor(_batch(), padding_side=padding_side)
  special = processor.special_tokens
  input_ids, mask = out["input_ids"], out["attention_mask"]
  assert input_ids.dtype == np.int32 and mask.dtype == np.int32 and input_ids.shape == mask.shape
  assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int32

  # Each row alone, unpadded, is what the padded row holds under its mask.
  per_row = [processor([conversation]) for conversation in _batch()]
  lengths = [row["input_ids"].shape[1] for row in per_row]
  assert input_ids.shape == (3, max(lengths))
  for r, (row, length) in enumerate(zip(per_row, lengths)):
    assert row["attention_mask"].all()
    real = slice(input_ids.shape[1] - length, None) if padding_side == "left" else slice(0, length)
    np.testing.assert_array_equal(mask[r, real], 1)
    assert mask[r].sum() == length
    np.testing.assert_array_equal(input_ids[r, real], row["input_ids"][0])
    assert (input_ids[r][mask[r] == 0] == special.pad).all()

  # Image pads per row: sum of that row's t*h*w/4; image spans are contiguous and bracketed.
  grids = out["image_grid_thw"]
  # 230x340 -> 84x112, 100x60 -> 112x56, 300x90 -> 196x56 under max_pixels 112*112.
  np.testing.assert_array_equal(grids, [[1, 6, 8], [1, 8, 4], [1, 14, 4]])
  images_per_row = [0, 1, 2]
  starts = np.cumsum([0] + images_per_row)
  for r in range(3):
    row_grids = grids[starts[r] : starts[r + 1]]
    assert (input_ids[r] == special.image_pad).sum() == sum(int(np.prod(g)) // 4 for g in row_grids)
    ids = input_ids[r][mask[r] == 1].tolist()
    assert ids.count(special.vision_start) == ids.count(special.vision_end) == images_per_row[r]
    for k, vision_start in enumerate(i for i, t in enumerate(ids) if t == special.vision_start):
      n = int(np.prod(row_grids[k])) // 4
      assert ids[vision_start + 1 : vision_start + 1 + n] == [special.image_pad] * n
      assert ids[vision_start + 1 + n] == special.vision_end
    prompt = processor.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    assert ids[-len(prompt) :] == prompt

  # pixel_values: the per-image rows in batch-row-major order.
  per_image = [processor.image_processor.process_image(image)[0] for image in (A, B, C)]
  np.testing.assert_array_equal(out["pixel_values"], np.concatenate(per_image))


def test_padding_options(processor):
  out = processor(_batch(), pad_to_multiple_of=64, add_generation_prompt=False)
  assert out["input_ids"].shape[1] % 64 == 0
  assert out["attention_mask"][:, 0].sum() == 0  # left padding: every row starts with padding
  ends = processor.tokenizer.encode("<|im_end|>\n", add_special_tokens=False).ids
  assert out["input_ids"][:, -2:].tolist() == [ends] * 3
  with pytest.raises(ValueError, match="padding_side"):
    processor(_batch(), padding_side="middle")
  with pytest.raises(ValueError, match="wrap a single conversation"):
    processor(_batch()[0])


def test_text_only_batch_has_empty_image_arrays(processor):
  out = processor([_batch()[0], _batch()[0]])
  assert out["pixel_values"].shape == (0, 1176) and out["image_grid_thw"].shape == (0, 3)
  assert out["attention_mask"].all()


def test_literal_image_pad_in_text_is_refused(processor):
  conversation = [{"role": "user", "content": [{"type": "image", "image": A},
                                               {"type": "text", "text": "see <|image_pad|>"}]}]
  with pytest.raises(ValueError, match="1 images but its text holds 2"):
    processor([conversation])


def test_decode(processor):
  out = processor(_batch(), padding_side="left")
  assert processor.decode(out["input_ids"][0], skip_special_tokens=True) == (
    "system\nYou are a helpful assistant.\n"
    "user\nIs a circle round? Answer true or false.\nassistant\n")
  full = processor.decode(out["input_ids"][1][out["attention_mask"][1] == 1])
  assert full == render_chat(_batch()[1])[0].replace("<|image_pad|>", "<|image_pad|>" * 12)
  texts = processor.batch_decode(out["input_ids"], skip_special_tokens=True)
  assert texts[2].endswith("versus\nassistant\n")


def test_save_and_from_pretrained(tmp_path, processor):
  processor.save_pretrained(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
  loaded = ChatProcessor.from_pretrained(tmp_path)
  assert loaded.image_processor == processor.image_processor
  assert loaded.special_tokens == processor.special_tokens
  a, b = processor(_batch()), loaded(_batch())
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ChatProcessor.from_pretrained(tmp_path / "nowhere")


def test_default_uses_qwen_ids_and_hub_images():
  default = ChatProcessor.default()
  assert default.special_tokens.image_pad == 151655 and default.special_tokens.pad == 151643
  assert default.image_processor == ImageProcessor()


def test_package_never_imports_torch():
  code = (
    "import sys\n"
    "from metaphorstar_jax.data import ChatProcessor, build_qwen_tokenizer\n"
    "from PIL import Image\n"
    "build_qwen_tokenizer()\n"
    "p = ChatProcessor.default()\n"
    "p([[{'role': 'user', 'content': [{'type': 'image', 'image': Image.new('RGB', (60, 60))}]}]])\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
