"""Task readers on hand-made files in the real layouts: bad rows are counted, logged skips."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metaphorstar_jax.tasks import ReadStats, get_task, load_records
from metaphorstar_jax.tasks import io as task_io
from metaphorstar_jax.tasks.records import load_or_generate


def png(colour=(200, 30, 30), size=(16, 12)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="PNG")
  return buffer.getvalue()


GOOD, OTHER = png(), png((10, 200, 10))
CORRUPT = GOOD[: len(GOOD) // 2]  # a truncated PNG
NOT_AN_IMAGE = b"definitely not an image"


def read(task_name, path, **options):
  stats = ReadStats(source=str(path))
  records = list(get_task(task_name, **options).read(str(path), stats))
  return records, stats


def write_tfq_parquet(path, rows):
  schema = pa.schema(
    [
      task_io.hf_images_schema_field(),
      pa.field("problem", pa.string()),
      pa.field("answer", pa.string()),
    ]
  )
  return task_io.write_parquet(str(path), rows, schema)


def image(data):
  return {"bytes": data, "path": None}


def test_tfq_parquet_skips(tmp_path, caplog):
  path = write_tfq_parquet(
    tmp_path / "data" / "test-00000-of-00001.parquet",
    [
      {"images": [image(GOOD)], "problem": "<image>The sky is red.", "answer": "F"},
      {"images": [image(CORRUPT)], "problem": "<image>Q", "answer": "T"},
      {"images": [image(NOT_AN_IMAGE)], "problem": "<image>Q", "answer": "T"},
      {"images": [image(GOOD)], "problem": None, "answer": "T"},
      {"images": [image(GOOD)], "problem": "<image>Q", "answer": None},
      {"images": [image(GOOD)], "problem": "<image>Q", "answer": "maybe"},
      {"images": [image(GOOD), image(OTHER)], "problem": "<image>only one mark", "answer": "T"},
      {"images": [], "problem": "<image>Q", "answer": "T"},
      {"images": [image(OTHER), image(GOOD)], "problem": "<image>left <image>right", "answer": "T"},
    ],
  )
  with caplog.at_level(logging.WARNING):
    records, stats = read("tfq", path)
  assert [r.prompt for r in records] == ["<image>The sky is red.", "<image>left <image>right"]
  assert records[1].images == (OTHER, GOOD)  # images stay in row order
  assert stats.read == 2 and stats.num_skipped == 7
  assert stats.skipped == {
    "corrupt image": 2,
    "missing field 'problem'": 1,
    "missing field 'answer'": 1,
    "bad answer": 1,
    "image markers mismatch": 1,
    "missing field 'images'": 1,
  }
  assert "test-00000-of-00001-1" in caplog.text and "corrupt image" in caplog.text
  assert "7 records" not in stats.summary() and "skipped 7" in stats.summary()


def test_tfq_answers_option(tmp_path):
  path = write_tfq_parquet(
    tmp_path / "x.parquet", [{"images": [image(GOOD)], "problem": "Q", "answer": "maybe"}]
  )
  records, stats = read("tfq", path, answers=None)
  assert len(records) == 1 and stats.num_skipped == 0


def test_tfq_jsonl_and_image_folder(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.png").write_bytes(GOOD)
  (tmp_path / "images" / "broken.png").write_bytes(CORRUPT)
  lines = [
    json.dumps({"id": "q1", "images": ["images/a.png"], "problem": "<image>Q1", "answer": "T"}),
    json.dumps({"id": "q2", "image": "images/a.png", "problem": "Q2", "answer": "F"}),
    json.dumps({"id": "q3", "images": ["images/missing.png"], "problem": "Q3", "answer": "T"}),
    json.dumps({"id": "q4", "images": ["images/broken.png"], "problem": "Q4", "answer": "T"}),
    "{not json",
    json.dumps(["a", "list"]),
    "",
    json.dumps(
      {
        "id": "q5",
        "images": ["data:image/png;base64," + base64.b64encode(GOOD).decode()],
        "problem": "Q5",
        "answer": "T",
        "Image_URL": "http://x/1.png",
      }
    ),
  ]
  path = tmp_path / "tfq.jsonl"
  path.write_text("\n".join(lines) + "\n")
  records, stats = read("tfq", path)
  assert [r.id for r in records] == ["q1", "q2", "q5"]
  assert records[2].metadata["group"] == "http://x/1.png"
  assert (
    records[0].metadata["group"] == records[1].metadata["group"]
  )  # same image bytes, same group
  assert records[0].images[0] is records[1].images[0]  # kept once
  assert stats.skipped == {"image not found": 1, "corrupt image": 1, "unreadable row": 2}


def test_missing_and_broken_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    read("tfq", tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No .parquet"):
    read("tfq", tmp_path / "empty")
  broken = tmp_path / "broken.parquet"
  broken.write_bytes(b"PAR1 but not really")
  with pytest.raises(ValueError, match="Cannot open parquet file"):
    read("tfq", broken)


def test_mcq_and_osq_skips(tmp_path):
  (tmp_path / "a.png").write_bytes(GOOD)
  rows = [
    {"id": "ok", "image": "a.png", "options": list("abcdef"), "answer": "C"},
    {"id": "letter", "image": "a.png", "options": list("abcdef"), "answer": "G"},
    {"id": "few", "image": "a.png", "options": ["only"], "answer": "A"},
    {"id": "noimage", "options": list("ab"), "answer": "A"},
  ]
  path = task_io.write_jsonl(str(tmp_path / "mcq.jsonl"), rows)
  records, stats = read("tfq_mcq", path)
  assert [r.id for r in records] == ["ok"] and records[
    0
  ].prompt == "What is the implication in this image?"
  assert stats.skipped == {
    "bad answer": 1,
    "missing field 'options'": 1,
    "missing field 'images'": 1,
  }
  path = task_io.write_jsonl(
    str(tmp_path / "osq.jsonl"), [{"image": "a.png", "answer": "Hope."}, {"image": "a.png"}]
  )
  records, stats = read("tfq_osq", path)
  assert len(records) == 1 and stats.skipped == {"missing field 'answer'": 1}


def reasonmap_root(tmp_path):
  (tmp_path / "maps" / "land").mkdir(parents=True)
  (tmp_path / "maps" / "land" / "city.png").write_bytes(GOOD)
  (tmp_path / "maps" / "land" / "broken.png").write_bytes(CORRUPT)
  (tmp_path / "stations" / "land").mkdir(parents=True)
  metro = {
    "Line 1": ["A Station", "B Station (Transfer Station)"],
    "Line 2": ["B Station (Transfer Station)", "C Station"],
  }
  (tmp_path / "stations" / "land" / "city.json").write_text(json.dumps(metro))
  return tmp_path


def test_reasonmap_train_skips(tmp_path):
  root = reasonmap_root(tmp_path)
  base = {
    "country": "land",
    "city": "city",
    "figure": "maps/land/city.png",
    "difficulty_city": "easy",
    "city_line_count": 2,
    "city_transfer_count": 1,
    "station_1": "A Station",
    "station_2": "C Station",
    "question_transfer_count": 1,
  }
  rows = [
    dict(base, question="Is A on Line 1?", type="TorF1", answer=1),
    dict(base, question="Plan a route.", type="planning", answer=None),
    dict(
      base, question="Q", type="torf2", answer="0"
    ),  # lower-case type and text answer are accepted
    dict(base, question="Q", type="Counting9", answer=1),
    dict(base, question="Q", type="TorF1", answer=None),
    dict(base, question="Q", type="TorF1", answer=1, difficulty_city="extreme"),
    dict(base, question="Q", type="TorF1", answer=1, figure="maps/land/broken.png"),
    dict(base, question="Q", type="TorF1", answer=1, figure="maps/land/gone.png"),
    dict(base, question="Plan.", type="planning", answer=None, city="atlantis"),  # no metro JSON
    dict(base, question="Plan.", type="planning", answer=None, question_transfer_count=None),
    dict(base, question="", type="TorF1", answer=1),
  ]
  path = task_io.write_jsonl(
    str(root / "ReasonMap-Train" / "data" / "train.jsonl"), rows
  )  # mixed answer types
  records, stats = read("reasonmap", path)
  assert [r.metadata["type"] for r in records] == ["TorF1", "planning", "TorF2"]
  assert records[2].answer == 0
  assert records[1].metadata["metro"] == {
    "Line 1": ["A Station", "B Station"],
    "Line 2": ["B Station", "C Station"],
  }
  assert records[0].images[0] is records[1].images[0]  # one copy of a shared map
  assert stats.skipped == {
    "bad field 'type'": 1,
    "bad answer": 1,
    "bad field 'difficulty_city'": 1,
    "corrupt image": 1,
    "image not found": 1,
    "missing metro JSON": 1,
    "bad field 'question_transfer_count'": 1,
    "missing field 'question'": 1,
  }


def test_reasonmap_benchmark_rows(tmp_path):
  root = reasonmap_root(tmp_path)
  routes = {
    "plan_0": [
      {
        "route_name": "Line 1",
        "departure_stop": "A",
        "arrival_stop": "B",
        "via_stops": [],
        "num_via_stops": 0,
      }
    ],
    "plan_1": None,
  }
  base = {
    "country": "land",
    "city": "city",
    "figure": base64.b64encode(GOOD).decode(),
    "difficulty_city": "middle",
    "station_1": "A Station",
    "station_2": "B Station",
    "question_transfer_count": 0,
    "question_short": "Short?",
    "question_long": "Long? Number of Via Stops:",
    "routes": json.dumps(routes),
  }
  rows = [
    base,
    dict(base, routes="{broken"),
    dict(base, question_long=None),
    dict(base, figure="bm90IGFuIGltYWdl"),
  ]
  path = task_io.write_parquet(str(root / "ReasonMap" / "data" / "validation.parquet"), rows)
  records, stats = read("reasonmap", path)
  assert [r.id for r in records] == ["validation-0-short", "validation-0-long"]
  assert records[0].metadata["routes"] == {"plan_0": routes["plan_0"]}
  assert stats.skipped == {
    "bad field 'routes'": 1,
    "missing field 'question_long'": 1,
    "corrupt image": 1,
  }
  records, _ = read("reasonmap", path, benchmark_questions=("long",))
  assert [r.id for r in records] == ["validation-0-long"]


def test_tvr_skips(tmp_path):
  (tmp_path / "i.png").write_bytes(GOOD)
  (tmp_path / "f.png").write_bytes(OTHER)
  objects = [{"color": "red", "shape": "cube", "size": "small", "material": "rubber"}]
  change = [{"object": 0, "attribute": "color", "value": "blue"}]
  base = {
    "images": ["i.png", "f.png"],
    "objects": objects,
    "transformations": change,
    "view": "left",
  }
  rows = [
    dict(base, id="ok"),
    dict(base, id="one_image", images=["i.png"]),
    dict(base, id="split_images", images=None, initial_image="i.png", final_image="f.png"),
    dict(
      base, id="no_object", transformations=[{"object": 3, "attribute": "color", "value": "blue"}]
    ),
    dict(
      base,
      id="no_attribute",
      transformations=[{"object": 0, "attribute": "position", "value": "left"}],
    ),
    dict(base, id="unreadable_change", transformations=[{"value": "blue"}]),
    dict(base, id="view", view="top"),
    dict(base, id="objects", objects=None),
  ]
  records, stats = read("tvr", task_io.write_jsonl(str(tmp_path / "tvr.jsonl"), rows))
  assert [r.id for r in records] == ["ok", "split_images"]
  assert records[0].answer == ((0, "color", "blue"),) and records[0].metadata["view"] == "left"
  assert stats.skipped == {
    "missing field 'images'": 1,
    "bad field 'transformations'": 3,
    "bad field 'view'": 1,
    "missing field 'objects'": 1,
  }


def test_cinema_skips(tmp_path):
  for name in ("a", "b"):
    (tmp_path / f"{name}.png").write_bytes(GOOD)
  base = {
    "images": ["a.png", "b.png"],
    "question": "Which?",
    "answer": "B",
    "answer_type": "mcq",
    "options": ["Image 1", "Image 2"],
  }
  rows = [
    dict(base, id="ok"),
    dict(base, id="type", answer_type="essay"),
    dict(base, id="letter", answer="C"),
    dict(base, id="number", answer_type="numeric", answer="many"),
    dict(base, id="empty", answer=""),
    dict(base, id="images", images=[]),
    dict(base, id="broken", images=["a.png", "missing.png"]),
    dict(base, id="numeric", answer_type="numeric", answer="3"),
  ]
  records, stats = read("cinema", task_io.write_jsonl(str(tmp_path / "cinema.jsonl"), rows))
  assert [r.id for r in records] == ["ok", "numeric"] and records[1].answer == 3.0
  assert stats.skipped == {
    "bad field 'answer_type'": 1,
    "bad answer": 2,
    "missing field 'answer'": 1,
    "missing field 'images'": 1,
    "image not found": 1,
  }


def test_load_records_limit_and_summary(tmp_path):
  path = write_tfq_parquet(
    tmp_path / "x.parquet", [{"images": [image(GOOD)], "problem": "Q", "answer": "T"}] * 5
  )
  records, stats = load_records(get_task("tfq"), path, limit=3)
  assert len(records) == 3 and "read 3 records" in stats.summary()


def test_image_loading_forms(tmp_path):
  (tmp_path / "x.png").write_bytes(GOOD)
  assert task_io.load_image_bytes(GOOD) == GOOD
  assert task_io.load_image_bytes({"bytes": None, "path": "x.png"}, [str(tmp_path)]) == GOOD
  assert task_io.load_image_bytes(os.path.join(tmp_path, "x.png")) == GOOD
  assert task_io.load_image_bytes("file://" + os.path.join(tmp_path, "x.png")) == GOOD
  assert task_io.load_image_bytes(base64.b64encode(GOOD).decode()) == GOOD
  cache = {}
  task_io.load_image_bytes("x.png", [str(tmp_path)], cache=cache)
  assert cache == {"x.png": GOOD}
  for bad in (None, "", b"", 3.5):
    with pytest.raises(task_io.RecordError):
      task_io.load_image_bytes(bad)
  assert task_io.to_pil(GOOD).size == (16, 12)


# --- splits, text encodings, damaged files and repeated ids (issue 15, item 7) ------------------


def tfq_row(problem, answer="T"):
  return {"images": [image(GOOD)], "problem": problem, "answer": answer}


def split_folder(root, splits):
  """A Hugging Face layout: data/<split>-00000-of-00001.parquet with one row naming its split."""
  for split in splits:
    write_tfq_parquet(root / "data" / f"{split}-00000-of-00001.parquet", [tfq_row(f"a {split} row")])
  return root


def test_a_folder_of_several_splits_is_read_by_split(tmp_path):
  folder = split_folder(tmp_path / "hf", ["train", "test"])
  with pytest.raises(ValueError, match=r"splits test, train.*data/test-00000-of-00001\.parquet.*"
                                       r"data/train-00000-of-00001\.parquet"):
    load_records(get_task("tfq"), str(folder))  # read whole, test rows would be trained on
  records, _ = load_records(get_task("tfq"), str(folder), split=task_io.TRAIN_SPLITS)
  assert [r.prompt for r in records] == ["a train row"]  # no test row reaches training
  records, _ = load_records(get_task("tfq"), str(folder), split=task_io.EVAL_SPLITS)
  assert [r.prompt for r in records] == ["a test row"]
  validation = split_folder(tmp_path / "bench", ["train", "validation"])
  records, _ = load_records(get_task("tfq"), str(validation), split=task_io.EVAL_SPLITS)
  assert [r.prompt for r in records] == ["a validation row"]
  with pytest.raises(ValueError, match="none of the test split asked for"):
    load_records(get_task("tfq"), str(validation), split="test")


def test_training_and_evaluation_data_are_read_by_split(tmp_path):
  folder = str(split_folder(tmp_path / "hf", ["train", "test"]))
  train, _ = load_or_generate(get_task("tfq"), folder, limit=None, scratch_dir=str(tmp_path),
                              split=task_io.TRAIN_SPLITS)
  held_out, _ = load_or_generate(get_task("tfq"), folder, limit=None, scratch_dir=str(tmp_path),
                                 split=task_io.EVAL_SPLITS, field="data.eval")
  assert [r.prompt for r in train] == ["a train row"]
  assert [r.prompt for r in held_out] == ["a test row"]


def test_a_folder_of_one_split_is_read_whole_and_stray_files_are_refused(tmp_path):
  only_test = split_folder(tmp_path / "bench", ["test"])  # TFQ-Bench's layout
  records, _ = load_records(get_task("tfq"), str(only_test), split=task_io.TRAIN_SPLITS)
  assert [r.prompt for r in records] == ["a test row"]
  mixed = split_folder(tmp_path / "mixed", ["train", "test"])
  write_tfq_parquet(mixed / "data" / "extra.parquet", [tfq_row("a stray row")])
  with pytest.raises(ValueError, match=r"files that name no split.*no split: data/extra\.parquet"):
    load_records(get_task("tfq"), str(mixed), split="train")


def test_split_names_follow_hugging_face():
  assert task_io.split_of("data/train-00000-of-00001.parquet") == "train"
  assert task_io.split_of("validation.jsonl") == "validation"
  assert task_io.split_of("dev/part_0.jsonl") == "validation"
  assert task_io.split_of("train/test-0.parquet") == "test"  # the word nearest the file wins
  assert task_io.split_of("device_logs.jsonl") is None and task_io.split_of("x.parquet") is None


def tfq_line(record_id, problem="Q"):
  return json.dumps({"id": record_id, "images": ["a.png"], "problem": problem, "answer": "T"})


def test_jsonl_text_is_strict_utf8_and_a_bad_line_is_a_counted_skip(tmp_path, caplog):
  (tmp_path / "a.png").write_bytes(GOOD)
  path = tmp_path / "tfq.jsonl"
  latin1 = json.dumps({"id": "q2", "images": ["a.png"], "problem": "Très bien.", "answer": "T"},
                      ensure_ascii=False).encode("latin-1")
  path.write_bytes(b"\n".join([tfq_line("q1").encode(), latin1, tfq_line("q3").encode()]) + b"\n")
  with caplog.at_level(logging.WARNING):
    records, stats = read("tfq", path)
  assert [r.id for r in records] == ["q1", "q3"]  # never the mangled text
  assert stats.skipped == {"unreadable row": 1} and "not UTF-8" in caplog.text


def test_a_byte_order_mark_costs_no_row(tmp_path):
  (tmp_path / "a.png").write_bytes(GOOD)
  jsonl = tmp_path / "tfq.jsonl"
  jsonl.write_bytes(b"\xef\xbb\xbf" + f"{tfq_line('q1')}\n{tfq_line('q2')}\n".encode())
  records, stats = read("tfq", jsonl)
  assert [r.id for r in records] == ["q1", "q2"] and stats.num_skipped == 0
  whole = tmp_path / "json" / "tfq.json"
  whole.parent.mkdir()
  (whole.parent / "a.png").write_bytes(GOOD)
  whole.write_bytes(b"\xef\xbb\xbf" + f"[{tfq_line('q1')}]".encode())
  assert [r.id for r in read("tfq", whole)[0]] == ["q1"]


def test_a_damaged_parquet_page_names_its_file(tmp_path):
  path = tmp_path / "big.parquet"
  rows = [tfq_row(f"question {index} " * 20) for index in range(300)]
  pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=100)
  damaged = bytearray(path.read_bytes())
  page = pq.ParquetFile(str(path)).metadata.row_group(2).column(1).data_page_offset
  damaged[page:page + 40] = bytes(byte ^ 0xFF for byte in damaged[page:page + 40])
  path.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=re.escape(f"Cannot read parquet file {path} past row 192")):
    read("tfq", path)


@pytest.mark.parametrize("content, message", [
  (b'[{"id": "q1",', "Cannot read JSON file {path}: Expecting"),
  ('[{"problem": "Très"}]'.encode("latin-1"), "Cannot read JSON file {path}: 'utf-8' codec"),
  (b"3", "JSON file {path} holds a int"),
], ids=["truncated", "latin-1", "a number"])
def test_a_bad_json_file_names_itself(tmp_path, content, message):
  path = tmp_path / "rows.json"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(message.format(path=path))):
    read("tfq", path)


def test_repeated_ids_are_counted_and_reported(tmp_path, caplog):
  (tmp_path / "a.png").write_bytes(GOOD)
  path = tmp_path / "tfq.jsonl"
  path.write_text("\n".join(tfq_line(i) for i in ["q1", "q1", "q2", "q1", "q2", "q3"]) + "\n")
  with caplog.at_level(logging.WARNING):
    records, stats = load_records(get_task("tfq"), str(path))
  assert len(records) == 6 and stats.duplicate_ids == {"q1": 2, "q2": 1}  # kept, counted
  assert "3 records repeat an earlier id (e.g. 'q1' x3, 'q2' x2)" in caplog.text
  assert "3 records repeat an earlier id" in stats.summary()
