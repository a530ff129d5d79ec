"""The Qwen2.5-VL chat template, rendered in plain Python.

`render_chat` produces exactly what the processor's jinja template (`CHAT_TEMPLATE`, spec
§6) renders, and also collects the images in the order their placeholders appear:

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n   (if the first turn is not system)
  <|im_start|>{role}\\n{content}<|im_end|>\\n                       (each message)
  <|im_start|>assistant\\n                                        (if add_generation_prompt)

An image item renders as <|vision_start|><|image_pad|><|vision_end|>, one placeholder that the
processor later widens to the image's token count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# The processor template of the Qwen2.5-VL Instruct checkpoints, stored in saved tokenizer configs.
CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
  "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
  "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif content['type'] == 'video' or 'video' in content %}"
  "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
  "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _turn(role: str, body: str) -> str:
  return f"<|im_start|>{role}\n{body}<|im_end|>\n"


def _is_image(item: Mapping[str, Any]) -> bool:
  return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video(item: Mapping[str, Any]) -> bool:
  return item.get("type") == "video" or "video" in item


def render_chat(
  messages: Sequence[Mapping[str, Any]],
  add_generation_prompt: bool = True,
  add_vision_id: bool = False,
) -> tuple[str, list[Any]]:
  """Renders one conversation to prompt text and collects its images.

  Args:
    messages: dicts {"role": str, "content": str | list of items}. An item is
      {"type": "text", "text": str} or {"type": "image", "image": PIL image or file path}
      (an "image_url" key also marks an image, as in the jinja template).
    add_generation_prompt: end with "<|im_start|>assistant\\n" so the model answers next.
    add_vision_id: put "Picture k: " before the k-th image.

  Returns:
    (text, images): the rendered text with one <|image_pad|> per image, and the images in the
    order their placeholders appear.
  """
  if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(
      f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}."
    )
  parts, images = [], []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(
        f"Message {index} must be a dict with 'role' and 'content' keys, got {message!r}."
      )
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
      raise TypeError(f"Message {index} role must be a string, got {role!r}.")
    if index == 0 and role != "system":
      parts.append(_turn("system", DEFAULT_SYSTEM_PROMPT))
    if isinstance(content, str):
      parts.append(_turn(role, content))
      continue
    if not isinstance(content, Sequence):
      raise TypeError(
        f"Message {index} content must be a string or a list of items, "
        f"got {type(content).__name__}."
      )
    body = []
    for item in content:
      if not isinstance(item, Mapping):
        raise TypeError(f"Message {index} has a content item that is not a dict: {item!r}.")
      if _is_image(item):
        image = item.get("image", item.get("image_url"))
        if image is None:
          raise ValueError(f"Message {index} has an image item with no image: {item!r}.")
        images.append(image)
        body.append(f"Picture {len(images)}: " if add_vision_id else "")
        body.append(IMAGE_PLACEHOLDER)
      elif _is_video(item):
        raise NotImplementedError(
          f"Message {index} has a video item; only images are supported so far."
        )
      elif "text" in item:
        if not isinstance(item["text"], str):
          raise TypeError(f"Message {index} has a text item whose text is not a string: {item!r}.")
        body.append(item["text"])
      else:
        raise ValueError(f"Message {index} has an item that is neither text nor image: {item!r}.")
    parts.append(_turn(role, "".join(body)))
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts), images
