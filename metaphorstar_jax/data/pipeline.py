"""Prompt batches for training and evaluation: a deterministic, shuffled, resumable grain pipeline.

Each record is turned into model inputs (chat template, image decoding and patching, tokens) in
grain workers when asked; the main process collects `batch_size` good examples per batch. A record
whose images will not decode, or that lacks a field, is skipped, counted by kind and logged with
its id; a prompt longer than the token budget is dropped whole (never truncated through an image).
A pass with no usable record at all is an error, not an endless loop.

The iterator's state (its position in the shuffled stream and the skip counts) is small JSON that
goes into every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from metaphorstar_jax.data.processor import ChatProcessor


@dataclasses.dataclass(frozen=True)
class Example:
  """One record ready for batching: its unpadded tokens and image patches (README "Shape
  letters": T prompt tokens, X patches, Y values per patch, I images)."""

  record: Any
  input_ids_T: np.ndarray
  pixel_values_XY: np.ndarray
  image_grid_thw_I3: np.ndarray


@dataclasses.dataclass(frozen=True)
class Skipped:
  record_id: str
  kind: str  # what the skip counters count: a few fixed kinds, never per-record text
  reason: str


# What a bad record raises while it is turned into model inputs: an image that will not decode
# (PIL raises OSError subclasses) or is too large, a missing field, a value the processor
# rejects. Anything else (a TypeError in a task's build_conversation, say) is a bug and stops the
# run instead of being counted as a skip.
RECORD_ERRORS = (OSError, ValueError, KeyError, Image.DecompressionBombError)
TOO_LONG = "too_long"


@dataclasses.dataclass(frozen=True)
class Batch:
  """`records`, their unpadded examples, and the collated arrays (left padding)."""

  records: list
  examples: list[Example]
  arrays: dict[str, np.ndarray]


class _Prepare:
  """Record -> Example | Skipped; a picklable callable so grain workers can run it."""

  def __init__(self, processor: ChatProcessor, build_conversation: Callable, max_prompt_tokens: int):
    self.processor = processor
    self.build_conversation = build_conversation
    self.max_prompt_tokens = max_prompt_tokens

  def __call__(self, record) -> Example | Skipped:
    record_id = str(getattr(record, "id", "?"))
    try:
      arrays = self.processor([self.build_conversation(record)], padding_side="right")
    except RECORD_ERRORS as error:  # a bad record must never stop the run: count it, say why
      return Skipped(record_id, type(error).__name__, f"{type(error).__name__}: {error}")
    length = int(arrays["attention_mask"].sum())
    if length > self.max_prompt_tokens:
      return Skipped(record_id, TOO_LONG, f"prompt of {length} tokens exceeds "
                     f"max_prompt_tokens {self.max_prompt_tokens}")
    return Example(record, arrays["input_ids"][0, :length], arrays["pixel_values"],
                   arrays["image_grid_thw"])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
  """Left-pads token rows and concatenates image patches in row order."""
  length = max(len(e.input_ids_T) for e in examples)
  ids = np.full((len(examples), length), pad_id, np.int32)
  mask = np.zeros((len(examples), length), np.int32)
  for row, example in enumerate(examples):
    ids[row, length - len(example.input_ids_T):] = example.input_ids_T
    mask[row, length - len(example.input_ids_T):] = 1
  return {
      "input_ids": ids,
      "attention_mask": mask,
      "pixel_values": np.concatenate([e.pixel_values_XY for e in examples]).astype(np.float32),
      "image_grid_thw": np.concatenate([e.image_grid_thw_I3 for e in examples]).astype(np.int32),
  }


class PromptStream:
  """Endless (or single-pass) batches of prompts from a list of records."""

  def __init__(self, records: Sequence[Any], processor: ChatProcessor,
               build_conversation: Callable, *, batch_size: int, seed: int, shuffle: bool = True,
               repeat: bool = True, max_prompt_tokens: int = 4096, num_workers: int = 0):
    if not records:
      raise ValueError("PromptStream got no records: the data source is empty or every row was "
                       "skipped; see the reader's skip log.")
    self.batch_size = batch_size
    self.pad_id = processor.special_tokens.pad
    dataset = grain.MapDataset.source(list(records))
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    if repeat:
      dataset = dataset.repeat()
    self._dataset = dataset.map(_Prepare(processor, build_conversation, max_prompt_tokens))
    self._num_workers = num_workers
    self._iterator = None  # made on the first draw, from the position set_state may have moved
    self.num_records = len(records)
    self.skipped = collections.Counter()
    self.consumed = 0
    self._exhausted = False

  def next_batch(self) -> Batch | None:
    """The next `batch_size` good examples; a smaller last batch, or None, when a pass ends."""
    examples, skipped_in_a_row = [], collections.Counter()
    if self._iterator is None:
      self._iterator = self._iterate_from(self.consumed)
    while len(examples) < self.batch_size and not self._exhausted:
      try:
        item = next(self._iterator)
      except StopIteration:
        self._exhausted = True
        break
      self.consumed += 1
      if isinstance(item, Skipped):
        self.skipped[item.kind] += 1
        skipped_in_a_row[item.kind] += 1
        logging.warning("Skipping record %s: %s", item.record_id, item.reason)
        # A usable record comes at least once in any 2N-1 draws of a repeated shuffled stream
        # (once per pass of N); 2N skips in a row mean none is left, and repeating loops forever.
        if sum(skipped_in_a_row.values()) >= 2 * self.num_records:
          raise ValueError(
              f"All {self.num_records} records are skipped ({dict(skipped_in_a_row)} in a row; "
              f"the last: {item.reason}). Fix the data, or raise data.max_prompt_tokens if the "
              f"prompts are '{TOO_LONG}'.")
        continue
      skipped_in_a_row.clear()
      examples.append(item)
    if not examples:
      return None
    return Batch([e.record for e in examples], examples, collate(examples, self.pad_id))

  def __iter__(self):
    while (batch := self.next_batch()) is not None:
      yield batch

  def _iterate_from(self, position: int):
    """An iterator over the prepared records from `position` of the (shuffled, repeated)
    stream on."""
    dataset = self._dataset[position:] if position else self._dataset
    dataset = dataset.to_iter_dataset()
    if self._num_workers > 0:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(dataset)

  def get_state(self) -> dict:
    """The stream's position: how many records it has drawn, and the skips among them. The
    same for any number of workers, so data.num_workers may change between a run and its
    resumption."""
    return {"position": self.consumed, "skipped": dict(self.skipped), "consumed": self.consumed}

  def set_state(self, state: dict) -> None:
    # Every record drawn is counted in `consumed`, so it is the position in the stream; states
    # saved before `position` existed hold it too.
    self.consumed = int(state.get("position", state.get("consumed", 0)))
    self._iterator = None
    self.skipped = collections.Counter(state.get("skipped", {}))


def screen_records(records: Sequence[Any], processor: ChatProcessor, build_conversation: Callable,
                   max_prompt_tokens: int) -> tuple[list[Example], collections.Counter]:
  """The records that pass training's guards (their images decode and are sane, their fields
  are there, the prompt fits `max_prompt_tokens`) as examples, in order, and the skips counted
  by kind; each skip is logged with its record's id. Evaluation reads its records through this,
  so a record training would skip never crashes an evaluation."""
  prepare = _Prepare(processor, build_conversation, max_prompt_tokens)
  examples, skipped = [], collections.Counter()
  for record in records:
    item = prepare(record)
    if isinstance(item, Skipped):
      skipped[item.kind] += 1
      logging.warning("Skipping record %s: %s", item.record_id, item.reason)
    else:
      examples.append(item)
  return examples, skipped
