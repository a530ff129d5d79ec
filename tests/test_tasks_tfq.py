"""metaphorstar_jax.tasks.tfq: TFQ-GRPO prompts, TFQ-Bench metrics, MCQ and OSQ."""

from __future__ import annotations

import pytest
from PIL import Image

from metaphorstar_jax.data import render_chat
from metaphorstar_jax.tasks import Record, get_task, tfq

RED = Image.new("RGB", (8, 8), (255, 0, 0))
BLUE = Image.new("RGB", (8, 8), (0, 0, 255))


def test_tfq_prompt_is_the_released_template():
  record = Record("q", (RED,), "  <image>The clock stands for passing time.\n", "T")
  conversation = get_task("tfq").build_conversation(record)
  assert conversation == [
    {
      "role": "user",
      "content": [
        {"type": "text", "text": tfq.TFQ_GRPO_PROMPT},
        {"type": "image", "image": RED},
        {"type": "text", "text": "The clock stands for passing time."},
      ],
    }
  ]
  text, images = render_chat(conversation)
  assert images == [RED]
  assert "True-false questions: <|vision_start|><|image_pad|><|vision_end|>The clock" in text
  assert tfq.TFQ_GRPO_PROMPT.startswith(
    "Please according to the image"
  ) and tfq.TFQ_GRPO_PROMPT.endswith(": ")


def test_images_follow_markers_or_come_first():
  content = tfq.interleave("a<image>b<image>", [RED, BLUE])
  assert content == [
    {"type": "text", "text": "a"},
    {"type": "image", "image": RED},
    {"type": "text", "text": "b"},
    {"type": "image", "image": BLUE},
  ]
  content = tfq.interleave("no marks", [RED, BLUE])
  assert [item["type"] for item in content] == ["image", "image", "text"]


def completion(answer: str) -> str:
  return f"<think>x</think><answer>{answer}</answer>"


def test_per_image_all_or_nothing_accuracy():
  records = [
    Record(f"{g}-{i}", (RED,), "q", a, {"group": g})
    for g, answers in (("img1", "TFT"), ("img2", "FF"), ("img3", "T"))
    for i, a in enumerate(answers)
  ]
  outputs = [
    completion("T"),
    completion("F"),
    completion("T"),  # img1 all right
    completion("F"),
    "I am not sure",  # img2: one empty answer
    "Answer: F",
  ]  # img3 wrong
  metrics = tfq.tfq_metrics(outputs, records)
  assert metrics["accuracy"] == pytest.approx(4 / 6)
  assert metrics["group_accuracy"] == pytest.approx(1 / 3)
  assert (
    metrics["empty_answers"] == 1.0
    and metrics["num_groups"] == 3.0
    and metrics["num_questions"] == 6.0
  )
  assert metrics["format_rate"] == pytest.approx(4 / 6)
  with pytest.raises(ValueError, match="one per record"):
    tfq.tfq_metrics(outputs[:2], records)


def test_mcq_prompt_and_metrics():
  record = Record(
    "m",
    (RED,),
    "What is the implication in this image?",
    "B",
    {
      "options": ("Time flies.", "Hope remains.", "Greed.", "War.", "Peace.", "Love."),
      "group": "m",
    },
  )
  text, _ = render_chat(tfq.mcq_conversation(record))
  assert "A. Time flies.\nB. Hope remains.\n" in text and "F. Love." in text
  metrics = tfq.mcq_metrics(["Answer: b", "<answer>C</answer>"], [record, record])
  assert metrics["accuracy"] == 0.5
  task = get_task("tfq_mcq")
  assert task.score(completion("B"), record)["overall"] == 1.0


def test_osq_scores_the_format_only_without_a_judge():
  record = Record("o", (RED,), "What is the implication in this image?", "Hope.")
  assert get_task("tfq_osq").score(completion("Hope"), record) == {"overall": 0.0, "format": 1.0}
  assert tfq.osq_metrics([completion("Hope"), "plain"], [record, record])["format_rate"] == 0.5
