"""Finding `<tag>...</tag>` spans in model output, in linear time.

The released scorers use regexes such as `<answer>(.*?)</answer>`. On adversarial text (many
opening tags and no closing one) Python's backtracking engine makes those quadratic or worse, and
a reward must stay fast on anything a policy writes. Each function here names the regex whose
result it reproduces exactly; tests/test_rewards_tags.py checks the equivalence on random text.
"""

from __future__ import annotations

from typing import Any


def as_text(completion: Any) -> str:
  """Model output as a str: bytes are decoded (invalid bytes replaced), None becomes ""."""
  if isinstance(completion, str):
    return completion
  if completion is None:
    return ""
  if isinstance(completion, (bytes, bytearray, memoryview)):
    return bytes(completion).decode("utf-8", errors="replace")
  return str(completion)


def first_tag_content_one_line(text: str, tag: str) -> str | None:
  """Content of the first `<tag>...</tag>` whose content has no newline.

  The same as `re.search(rf"<{tag}>(.*?)</{tag}>", text)` without DOTALL: group(1), or None.
  """
  opening, closing = f"<{tag}>", f"</{tag}>"
  start = text.find(opening)
  while start != -1:
    body = start + len(opening)
    end = text.find(closing, body)
    if end == -1:
      return None
    newline = text.find("\n", body, end)
    if newline == -1:
      return text[body:end]
    # Every opening before the newline meets the same newline before its first closing.
    start = text.find(opening, newline + 1)
  return None


def all_tag_contents(text: str, tag: str) -> list[str]:
  """Contents of all non-overlapping `<tag>...</tag>` spans, left to right.

  The same as `re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)`.
  """
  opening, closing = f"<{tag}>", f"</{tag}>"
  contents, position = [], 0
  while True:
    start = text.find(opening, position)
    if start == -1:
      return contents
    end = text.find(closing, start + len(opening))
    if end == -1:
      return contents
    contents.append(text[start + len(opening) : end])
    position = end + len(closing)


def last_tag_content(text: str, tag: str) -> str | None:
  """Content of the last `<tag>...</tag>` span (DOTALL, as `all_tag_contents`), or None."""
  contents = all_tag_contents(text, tag)
  return contents[-1] if contents else None


def is_think_answer_format(text: str) -> bool:
  """Whether the whole text is `<think>...</think>...<answer>...</answer>`.

  The same as `re.fullmatch(r"<think>.*?</think>.*?<answer>.*?</answer>", text, re.DOTALL)`:
  leading or trailing text, even a newline, fails.
  """
  if not (text.startswith("<think>") and text.endswith("</answer>")):
    return False
  think_end = text.find("</think>", len("<think>"))
  if think_end == -1:
    return False
  answer_start = text.find("<answer>", think_end + len("</think>"))
  # The final </answer> must start at or after the end of that <answer>.
  return answer_start != -1 and answer_start + len("<answer>") <= len(text) - len("</answer>")
