"""Data: image preprocessing, tokenizers, the chat template and the Qwen2.5-VL chat processor."""

from metaphorstar_jax.data.chat_template import CHAT_TEMPLATE, render_chat
from metaphorstar_jax.data.image_processor import ImageProcessor, num_image_tokens, smart_resize
from metaphorstar_jax.data.processor import ChatProcessor
from metaphorstar_jax.data.tokenizer import (
  SpecialTokens,
  build_qwen_tokenizer,
  build_small_tokenizer,
  load_tokenizer,
  save_tokenizer,
)

__all__ = [
  "CHAT_TEMPLATE",
  "ChatProcessor",
  "ImageProcessor",
  "SpecialTokens",
  "build_qwen_tokenizer",
  "build_small_tokenizer",
  "load_tokenizer",
  "num_image_tokens",
  "render_chat",
  "save_tokenizer",
  "smart_resize",
]
