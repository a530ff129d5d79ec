"""metaphorstar_jax.rewards.tags: linear-time tag finding equals the released regexes."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from metaphorstar_jax.rewards import tags

PIECES = [
  "<think>",
  "</think>",
  "<answer>",
  "</answer>",
  "<answer",
  "answer>",
  "</",
  "<",
  ">",
  "\n",
  "a",
  "T",
  " ",
]
TAG_SOUP = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=1500, deadline=None)
@given(TAG_SOUP)
def test_first_tag_content_one_line_equals_regex(text):
  match = re.search(r"<answer>(.*?)</answer>", text)
  assert tags.first_tag_content_one_line(text, "answer") == (match.group(1) if match else None)


@settings(max_examples=1500, deadline=None)
@given(TAG_SOUP)
def test_all_tag_contents_equals_regex(text):
  assert tags.all_tag_contents(text, "answer") == re.findall(
    r"<answer>(.*?)</answer>", text, re.DOTALL
  )


@settings(max_examples=1500, deadline=None)
@given(TAG_SOUP)
def test_think_answer_format_equals_regex(text):
  expected = re.fullmatch(r"<think>.*?</think>.*?<answer>.*?</answer>", text, re.DOTALL) is not None
  assert tags.is_think_answer_format(text) is expected


def test_examples():
  assert tags.is_think_answer_format("<think></think><answer></answer>")
  assert not tags.is_think_answer_format("<think></think><answer></answer> ")
  assert (
    tags.first_tag_content_one_line("<answer>\nF\n</answer><answer>T</answer>", "answer") == "T"
  )
  assert tags.last_tag_content("<answer>a</answer> <answer>b</answer>", "answer") == "b"
  assert tags.last_tag_content("no tags", "answer") is None
  assert tags.as_text(b"\xff<answer>") == "\ufffd<answer>"
  assert tags.as_text(None) == ""


def test_linear_time_on_adversarial_text():
  texts = [
    "<answer>" * 300_000,
    "<answer>\n" * 200_000,
    "<think>" + "</think>" * 200_000,
    "<think>" + "<answer>" * 200_000 + "</answer>x",
  ]
  start = time.perf_counter()
  for text in texts:
    tags.first_tag_content_one_line(text, "answer")
    tags.all_tag_contents(text, "answer")
    tags.is_think_answer_format(text)
  assert time.perf_counter() - start < 2.0
