"""PromptStream: skipped records are counted by kind, a stream with no usable record is an error
rather than an endless loop, and a bug in a task's conversation builder is not a skip."""

import pytest

from metaphorstar_jax import data
from metaphorstar_jax.data.pipeline import TOO_LONG, PromptStream
from metaphorstar_jax.tasks import get_task, load_records


def shapes_stream(max_prompt_tokens, build=None, num_records=6, batch_size=2):
  task = get_task("shapes", num_records=num_records, image_size=56, seed=0)
  records, _ = load_records(task, None)
  processor = data.ChatProcessor.from_tokenizer(
      data.build_small_tokenizer(), data.ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56))
  return PromptStream(records, processor, build or task.build_conversation,
                      batch_size=batch_size, seed=0, max_prompt_tokens=max_prompt_tokens)


def test_every_record_too_long_is_an_error_naming_the_budget():
  stream = shapes_stream(max_prompt_tokens=4)
  with pytest.raises(ValueError, match="max_prompt_tokens"):
    stream.next_batch()
  assert set(stream.skipped) == {TOO_LONG}  # one key, whatever the prompt lengths


def test_a_bug_in_the_conversation_builder_is_raised_not_skipped():
  def broken(record):
    raise TypeError("a bug in build_conversation")
  stream = shapes_stream(max_prompt_tokens=512, build=broken)
  with pytest.raises(TypeError, match="a bug in build_conversation"):
    stream.next_batch()


def test_good_records_still_batch_and_the_state_keys_stay_few():
  stream = shapes_stream(max_prompt_tokens=512)
  batches = [stream.next_batch() for _ in range(4)]
  assert all(len(b.records) == 2 for b in batches)
  assert stream.get_state()["skipped"] == {}
