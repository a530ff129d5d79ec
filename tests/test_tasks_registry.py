"""metaphorstar_jax.tasks: every task end to end on its miniature, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaphorstar_jax.data import ChatProcessor, ImageProcessor, build_small_tokenizer, render_chat
from metaphorstar_jax.tasks import (
  Record,
  get_task,
  load_records,
  task_names,
  write_miniature,
)
from metaphorstar_jax.tasks import io as task_io

TASKS = task_names()
MINIATURE_SIZE = 6


def oracle(name: str, record: Record) -> str | None:
  """A perfect completion for a record, or None where the task has no rule-based answer."""
  if name in ("shapes", "tfq", "tfq_mcq"):
    return f"<think>Looking closely.</think> <answer>{record.answer}</answer>"
  if name == "tvr":
    return (
      "<think>Compare.</think><answer>"
      + "; ".join(f"{i}.{a}.{v}" for i, a, v in record.answer)
      + "</answer>"
    )
  if name == "cinema":
    answer = record.answer if not isinstance(record.answer, float) else f"{record.answer:g}"
    return f"<global>All images.</global><think>Reason.</think><answer>{answer}</answer>"
  if name == "reasonmap":
    kind, metadata = metadata_kind(record), record.metadata
    if kind == "vqa":
      value = record.answer
      if metadata["type"].startswith("TorF"):
        value = "yes" if value else "no"
      elif metadata["type"] == "Counting1":
        value = "ABCD"[value]
      return f"So the answer is \\boxed{{{value}}}."
    if kind == "bench":
      plan = next(iter(metadata["routes"].values()))
      stations = {s.replace(" Station", ""): s for line in metadata["metro"].values() for s in line}
      lines = []
      for leg in plan:
        lines.append(
          f"Route Name: {leg['route_name']}\nDeparture Stop: {stations.get(leg['departure_stop'], leg['departure_stop'])}\n"
          f"Arrival Stop: {stations.get(leg['arrival_stop'], leg['arrival_stop'])}\n"
          f"Number of Via Stops: {leg['num_via_stops']}\nVia Stops: {', '.join(leg['via_stops'])}\n"
        )
      return "--".join(lines)
  return None


def metadata_kind(record: Record) -> str:
  if record.metadata.get("question_kind"):
    return "bench"
  return "planning" if record.metadata.get("type") == "planning" else "vqa"


@pytest.fixture(scope="module")
def miniatures(tmp_path_factory):
  paths = {}
  for name in TASKS:
    paths[name] = write_miniature(name, str(tmp_path_factory.mktemp(name)), MINIATURE_SIZE, seed=0)
  return paths


@pytest.mark.parametrize("name", TASKS)
def test_miniature_reads_back_without_skips(name, miniatures):
  task = get_task(name)
  records, stats = load_records(task, miniatures[name])
  assert stats.num_skipped == 0 and stats.read == len(records) >= MINIATURE_SIZE // 2
  assert len({r.id for r in records}) == len(records)


@pytest.mark.parametrize("name", TASKS)
def test_conversations_render_with_all_images(name, miniatures):
  task = get_task(name)
  records, _ = load_records(task, miniatures[name])
  for record in records:
    conversation = task.build_conversation(record)
    text, images = render_chat(conversation)
    assert len(images) == len(record.images) == text.count("<|image_pad|>")
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", TASKS)
def test_oracle_completions_score_full_marks(name, miniatures):
  task = get_task(name)
  records, _ = load_records(task, miniatures[name])
  completions = [oracle(name, r) for r in records]
  checked = [(c, r) for c, r in zip(completions, records) if c is not None]
  for completion, record in checked:
    result = task.score(completion, record)
    assert result.get("accuracy", 1.0) == 1.0, (record.id, completion, result)
  metrics = task.evaluate([c or "" for c in completions], records)
  assert all(isinstance(v, float) for v in metrics.values())
  for key in (
    "accuracy",
    "group_accuracy",
    "acc",
    "loose_acc",
    "accuracy_vqa",
    "accuracy_short",
    "accuracy_long",
  ):
    if key in metrics:
      assert metrics[key] == 1.0, (key, metrics)


@pytest.mark.parametrize("name", TASKS)
def test_miniature_is_deterministic_by_seed(name, tmp_path):
  task = get_task(name)

  def read(seed, folder):
    records, _ = load_records(task, write_miniature(name, str(tmp_path / folder), 4, seed=seed))
    return [
      (r.prompt, str(r.answer), [np.asarray(task_io.to_pil(i)).tobytes() for i in r.images])
      for r in records
    ]

  first = read(7, "a")
  assert first == read(7, "b")
  assert first != read(8, "c")


@pytest.mark.parametrize("name", TASKS)
def test_chat_processor_accepts_conversations(name, miniatures):
  task = get_task(name)
  records, _ = load_records(task, miniatures[name], limit=2)
  processor = ChatProcessor.from_tokenizer(
    build_small_tokenizer(), ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
  )
  batch = processor([task.build_conversation(r) for r in records])
  assert batch["image_grid_thw"].shape[0] == sum(len(r.images) for r in records)
  assert batch["input_ids"].shape[0] == len(records)


TEXT = st.one_of(
  st.text(max_size=200),
  st.binary(max_size=200).map(lambda data: data.decode("latin-1")),
  st.lists(
    st.sampled_from(
      [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<global>",
        "</global>",
        "T",
        "B",
        "2",
        ".color.",
        "Route Name: ",
        "Arrival Stop: ",
        "--",
        "\\boxed{",
        "}",
        "\n",
      ]
    ),
    max_size=50,
  ).map("".join),
  st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(["<answer>", "--", "(", "\\"]),
    st.integers(0, 3000),
  ),
)


@pytest.mark.parametrize("name", TASKS)
def test_scores_never_raise(name, miniatures):
  task = get_task(name)
  records, _ = load_records(task, miniatures[name], limit=3)
  unguarded = task.score.__wrapped__

  @settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
  )
  @given(TEXT)
  def check(completion):
    for record in records:
      result = unguarded(completion, record)
      assert "overall" in result and all(
        isinstance(v, float) and np.isfinite(v) for v in result.values()
      )

  check()


def test_guard_turns_a_crash_into_zero():
  task = get_task("tfq")
  broken = Record("r", (), "", answer=object())
  assert task.score("<think>x</think><answer>T</answer>", broken)["overall"] == 0.5  # format only
  reasonmap = get_task("reasonmap")
  assert reasonmap.score("x", Record("r", (), "", None, metadata=None)) == {
    "overall": 0.0,
    "scoring_error": 1.0,
  }


def test_unknown_names_and_options():
  with pytest.raises(ValueError, match="Unknown task 'nope'"):
    get_task("nope")
  with pytest.raises(ValueError, match="valid options are"):
    get_task("tfq", format_wieght=0.3)
  assert get_task("tfq", format_weight=0.3).options.format_weight == 0.3
  assert get_task("metaphorstar_jax.tasks.shapes").name == "shapes"  # a module path also works
  with pytest.raises(ValueError, match="curriculum"):
    get_task("reasonmap", curriculum="backwards")


def test_load_records_rejects_an_all_bad_source(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"problem": "x"}\n{"answer": "T"}\n')
  with pytest.raises(ValueError, match="No usable record"):
    load_records(get_task("tfq"), str(path))
