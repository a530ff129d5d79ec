"""Chat conversations with images -> padded model inputs for Qwen2.5-VL.

Per conversation: render the chat template, preprocess its images, widen each image
placeholder to <|vision_start|> + n x <|image_pad|> + <|vision_end|> with n = t*h*w / merge**2,
tokenize. Then pad the batch.

Shape letters (README "Shape letters"): B rows (conversations), T tokens, I images in the batch,
X patch rows, Y values per patch row.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from metaphorstar_jax.data import tokenizer as tokenizer_lib
from metaphorstar_jax.data.chat_template import render_chat
from metaphorstar_jax.data.image_processor import ImageProcessor, num_image_tokens

IMAGE_PAD = "<|image_pad|>"
PADDING_SIDES = ("left", "right")

Conversation = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class ChatProcessor:
  """Tokenizer + image processor for Qwen2.5-VL chats; call it on a batch of conversations."""

  tokenizer: Tokenizer = dataclasses.field(repr=False)  # its repr lists the whole vocabulary
  image_processor: ImageProcessor
  special_tokens: tokenizer_lib.SpecialTokens

  @classmethod
  def from_tokenizer(
    cls, tokenizer: Tokenizer, image_processor: ImageProcessor | None = None
  ) -> ChatProcessor:
    """Wraps `tokenizer` (ids resolved from it) and an image processor (hub defaults if None)."""
    return cls(
      tokenizer=tokenizer,
      image_processor=image_processor or ImageProcessor(),
      special_tokens=tokenizer_lib.SpecialTokens.from_tokenizer(tokenizer),
    )

  @classmethod
  def default(cls) -> ChatProcessor:
    """The Qwen2.5 tokenizer built offline with the hub image settings."""
    return cls.from_tokenizer(tokenizer_lib.load_tokenizer(), ImageProcessor())

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike) -> ChatProcessor:
    """Reads `tokenizer.json` and `preprocessor_config.json` from a local checkpoint directory."""
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"Checkpoint directory {os.fspath(directory)!r} does not exist.")
    return cls.from_tokenizer(
      tokenizer_lib.load_tokenizer(directory), ImageProcessor.from_pretrained(directory)
    )

  def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and preprocessor_config.json; returns paths."""
    paths = tokenizer_lib.save_tokenizer(self.tokenizer, directory)
    return [*paths, self.image_processor.save_pretrained(directory)]

  def _expand_image_pads(self, text: str, grids_thw: np.ndarray, conversation_index: int) -> str:
    """Replaces the k-th <|image_pad|> in `text` by as many copies as image k has LLM tokens."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(grids_thw):
      raise ValueError(
        f"Conversation {conversation_index} has {len(grids_thw)} images but its text holds "
        f"{len(pieces) - 1} {IMAGE_PAD} markers; remove {IMAGE_PAD} from the message text."
      )
    expanded = [pieces[0]]
    for grid_thw, piece in zip(grids_thw, pieces[1:]):
      expanded.append(IMAGE_PAD * num_image_tokens(grid_thw, self.image_processor.merge_size))
      expanded.append(piece)
    return "".join(expanded)

  def __call__(
    self,
    conversations: Sequence[Conversation],
    add_generation_prompt: bool = True,
    padding_side: str = "left",
    pad_to_multiple_of: int | None = None,
    add_vision_id: bool = False,
  ) -> dict[str, np.ndarray]:
    """Turns a batch of conversations into padded model inputs.

    Args:
      conversations: B conversations, each a list of {"role", "content"} messages (see
        `render_chat` for the content items).
      add_generation_prompt: end each prompt with "<|im_start|>assistant\\n".
      padding_side: "left" (for generation) or "right".
      pad_to_multiple_of: round T up to a multiple of this, to limit recompiles.
      add_vision_id: put "Picture k: " before the k-th image of each conversation.

    Returns:
      {"input_ids": int32 (B, T), pad positions hold the <|endoftext|> id,
       "attention_mask": int32 (B, T), 1 on real tokens,
       "pixel_values": float32 (X, Y), all images, row-major over the batch ((0, Y) if none),
       "image_grid_thw": int32 (I, 3), one [t, h, w] per image in the same order ((0, 3) if none)}.
    """
    if padding_side not in PADDING_SIDES:
      raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
      raise ValueError(
        f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}."
      )
    if isinstance(conversations, (str, Mapping)) or not conversations:
      raise ValueError("conversations must be a non-empty list of conversations (message lists).")
    if isinstance(conversations[0], Mapping):
      raise ValueError("conversations must be a batch: wrap a single conversation as [messages].")

    texts, pixel_rows, grids = [], [], []
    for index, conversation in enumerate(conversations):
      text, images = render_chat(conversation, add_generation_prompt, add_vision_id)
      image_batch = self.image_processor(images)
      texts.append(self._expand_image_pads(text, image_batch["image_grid_thw"], index))
      pixel_rows.append(image_batch["pixel_values"])
      grids.append(image_batch["image_grid_thw"])

    # The template already holds every marker token, so no post-processor tokens are added.
    encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = [len(encoding.ids) for encoding in encodings]
    max_length = max(lengths)
    if pad_to_multiple_of:
      max_length = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids_BT = np.full((len(texts), max_length), self.special_tokens.pad, dtype=np.int32)
    attention_mask_BT = np.zeros((len(texts), max_length), dtype=np.int32)
    for row, (encoding, length) in enumerate(zip(encodings, lengths)):
      start = max_length - length if padding_side == "left" else 0
      input_ids_BT[row, start : start + length] = encoding.ids
      attention_mask_BT[row, start : start + length] = 1

    return {
      "input_ids": input_ids_BT,
      "attention_mask": attention_mask_BT,
      "pixel_values": np.concatenate(pixel_rows).astype(np.float32, copy=False),
      "image_grid_thw": np.concatenate(grids).astype(np.int32, copy=False),
    }

  def decode(self, ids_T: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    """Token ids (T,) -> text; skip_special_tokens drops chat/vision markers and padding."""
    ids = [int(i) for i in np.asarray(ids_T).reshape(-1)]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def batch_decode(
    self, ids_BT: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False
  ) -> list[str]:
    """Token ids (B, T) -> B texts; see `decode`."""
    return [self.decode(ids_T, skip_special_tokens) for ids_T in ids_BT]
