"""metaphorstar_jax.tasks.reasonmap: layouts, prompt, curriculum and metrics on the miniature."""

from __future__ import annotations

import os

import pytest

from metaphorstar_jax.data import render_chat
from metaphorstar_jax.rewards import reasonmap as rm
from metaphorstar_jax.tasks import Record, get_task, load_records
from metaphorstar_jax.tasks.reasonmap import curriculum_order


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("reasonmap"))
  train = get_task("reasonmap").write_miniature(root, 12, 0)
  return {
    "root": root,
    "train": train,
    "plus": os.path.join(root, "ReasonMap-Plus"),
    "bench": os.path.join(root, "ReasonMap"),
  }


def plan_route(metro, start, goal):
  """A route with the fewest transfers (at most one), found by brute force."""
  for line, stations in metro.items():
    if start in stations and goal in stations:
      return [(line, start, goal)]
  for first, a in metro.items():
    for second, b in metro.items():
      for transfer in set(a) & set(b):
        if start in a and goal in b and first != second and transfer not in (start, goal):
          return [(first, start, transfer), (second, transfer, goal)]
  return None


def test_three_layouts(miniature):
  task = get_task("reasonmap")
  train, _ = load_records(task, miniature["train"])
  plus, _ = load_records(task, miniature["plus"])
  bench, _ = load_records(task, miniature["bench"])
  assert len(train) == len(plus) == 12 and len(bench) == 24
  assert {r.metadata["type"] for r in plus} <= set(rm.TORF_TYPES + rm.COUNTING_TYPES)
  assert any(r.metadata["type"] == "planning" for r in train)
  assert [r.metadata["question_kind"] for r in bench[:2]] == ["short", "long"]
  assert all(
    "(Transfer Station)" not in s
    for r in train
    if "metro" in r.metadata
    for stations in r.metadata["metro"].values()
    for s in stations
  )


def test_prompt(miniature):
  record = load_records(get_task("reasonmap"), miniature["train"], limit=1)[0][0]
  text, images = render_chat(get_task("reasonmap").build_conversation(record))
  assert len(images) == 1
  assert text.startswith(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>\n" + record.prompt
  )
  custom = get_task("reasonmap", system_prompt="Be brief.").build_conversation(record)
  assert custom[0] == {"role": "system", "content": "Be brief."}


def test_planning_rewards_on_the_miniature(miniature):
  task = get_task("reasonmap")
  fixed = get_task("reasonmap", fix_leg_count_off_by_one=True)
  records, _ = load_records(task, miniature["train"])
  planning = [r for r in records if r.metadata["type"] == "planning"]
  assert planning
  for record in planning:
    metadata = record.metadata
    legs = plan_route(metadata["metro"], metadata["station_1"], metadata["station_2"])
    answer = "--\n".join(
      f"Route Name: {line}\nDeparture Stop: {a}\nArrival Stop: {b}\n" for line, a, b in legs
    )
    released, corrected = task.score(answer, record), fixed.score(answer, record)
    assert released["accuracy"] == corrected["accuracy"] == 1.0
    assert corrected["detail"] - released["detail"] == 5.0  # the released rule's last-leg penalty
    assert task.score("no idea", record)["overall"] == 0.0
  metrics = task.evaluate([""] * len(records), records)
  assert metrics["accuracy_planning"] == 0.0 and "accuracy_vqa" in metrics


def test_curriculum_orders():
  types = ["planning", "Counting1", "TorF2", "Counting3", "TorF1", "Counting2", "planning", "TorF1"]
  records = [Record(str(i), (), "q", 0, {"type": t}) for i, t in enumerate(types)]
  ordered = [r.metadata["type"] for r in curriculum_order(records, "rewardmap", seed=0)]
  stage = {"TorF1": 0, "TorF2": 0, "Counting2": 1, "Counting3": 1, "Counting1": 2, "planning": 3}
  assert [stage[t] for t in ordered] == sorted(stage[t] for t in types)
  coarse = [r.metadata["type"] for r in curriculum_order(records, "coarse", seed=0)]
  assert coarse[-2:] == ["planning", "planning"]
  fine = [r.metadata["type"] for r in curriculum_order(records, "fine", seed=0)]
  assert fine == [
    "TorF1",
    "TorF1",
    "TorF2",
    "Counting3",
    "Counting2",
    "Counting1",
    "planning",
    "planning",
  ]
  assert [r.id for r in curriculum_order(records, "none", 0)] == [r.id for r in records]
  assert [r.id for r in curriculum_order(records, "rewardmap", 1)] == [
    r.id for r in curriculum_order(records, "rewardmap", 1)
  ]
  with pytest.raises(ValueError, match="unknown types"):
    curriculum_order([Record("x", (), "q", 0, {"type": "essay"})], "rewardmap", 0)


def test_task_order_and_shuffle_flags():
  assert get_task("reasonmap").shuffle is False
  assert get_task("reasonmap", curriculum="none").shuffle is True
  records = [
    Record("a", (), "q", None, {"type": "planning"}),
    Record("b", (), "q", 1, {"type": "TorF1"}),
  ]
  assert [r.id for r in get_task("reasonmap").order(records, 0)] == ["b", "a"]


def test_answer_after_think_option(miniature):
  records, _ = load_records(get_task("reasonmap"), miniature["plus"])
  record = records[0]
  truth = record.answer
  value = (
    ("yes" if truth else "no")
    if record.metadata["type"].startswith("TorF")
    else ("ABCD"[truth] if record.metadata["type"] == "Counting1" else truth)
  )
  thinking = f"<think>maybe \\boxed{{zzz}}</think>The answer is {value}"
  assert get_task("reasonmap", answer_after_think=True).score(thinking, record)["accuracy"] == 1.0
  assert (
    get_task("reasonmap").score(thinking, record)["accuracy"] == 0.0
  )  # the box in the thinking wins
