"""RewardMap on transit maps: ReasonMap, ReasonMap-Plus and ReasonMap-Train (spec §2).

Data layouts read (parquet, as the FSCCS Hugging Face datasets hold them, or JSONL):
* ReasonMap-Train / ReasonMap-Plus: one question per row with `question`, `type` (TorF1, TorF2,
  Counting1, Counting2, Counting3, planning), `answer` (int; unused for planning), `station_1`,
  `station_2`, `figure` (the map: a path relative to the dataset folders, a Hugging Face image
  struct, or base64), `difficulty_city` (easy/middle/hard), `city_line_count`,
  `city_transfer_count`, `question_transfer_count`, `country`, `city` and, for planning, `json`
  (path to the city's metro JSON; without it `stations/<country>/<city>.json` is looked up).
* ReasonMap (the benchmark): one planning sample per row with `question_short`,
  `question_long`, `routes` (map-API reference plans, a dict or its JSON text) and the fields
  above; each row becomes two records, "<id>-short" and "<id>-long".
The metro JSON maps line names to station lists; "(Transfer Station)"-style notes are dropped.

Prompt (RewardMap verl/utils/rl_dataset.py): the user message is "<image>\\n{question}" with the
config's system prompt "You are a helpful assistant." (the Qwen template's default). The
"Context:" metadata string the dataset builds is not used by the template, so not here either.

Training order: RewardMap reorders the data once into a curriculum and reads it without
shuffling: TorF1+TorF2, then Counting2+Counting3, then Counting1, then planning, each stage
shuffled (`curriculum="rewardmap"`; "coarse", "fine" and "none" are the release's commented
alternatives and plain order).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import ImageDraw

from metaphorstar_jax.rewards import reasonmap as rm
from metaphorstar_jax.rewards.tags import as_text
from metaphorstar_jax.tasks import drawing, io
from metaphorstar_jax.tasks.records import (
  Conversation,
  Record,
  RecordError,
  Task,
  guard_score,
  make_options,
)

CURRICULA = ("rewardmap", "coarse", "fine", "none")
_TYPE_BY_LOWER = {t.lower(): t for t in rm.QUESTION_TYPES}
_VQA_TYPES = rm.TORF_TYPES + rm.COUNTING_TYPES


@dataclasses.dataclass(frozen=True)
class ReasonMapOptions:
  """Options of the `reasonmap` task.

  Attributes:
    difficulty_aware: weight rewards by city difficulty and transfers (the release).
    fix_leg_count_off_by_one: the corrected planning leg penalty (see rewards/reasonmap.py).
    format_bonus: reward added for a parseable answer; 0 in the release.
    curriculum: "rewardmap" (the release), "coarse", "fine" or "none" (module doc).
    system_prompt: a system message; None leaves the template's default, which is RewardMap's.
    roots: extra folders to resolve relative map and metro-JSON paths against (the data file's
      folder and its two parents are always tried).
    check_images: decode each distinct map once when reading.
    max_image_pixels: PIL's size limit for maps (None: none; real maps exceed PIL's default).
    benchmark_questions: which ReasonMap questions become records ("short", "long").
    answer_after_think: score only the text after the last "</think>" (ReasonMap does this for
      thinking models; off for Qwen2.5-VL, as in the release).
    miniature_image_size: side of the miniature's map images.
  """

  difficulty_aware: bool = True
  fix_leg_count_off_by_one: bool = False
  format_bonus: float = 0.0
  curriculum: str = "rewardmap"
  system_prompt: str | None = None
  roots: tuple[str, ...] = ()
  check_images: bool = True
  max_image_pixels: int | None = None
  benchmark_questions: tuple[str, ...] = ("short", "long")
  answer_after_think: bool = False
  miniature_image_size: int = 448

  def __post_init__(self):
    if self.curriculum not in CURRICULA:
      raise ValueError(f"curriculum must be one of {CURRICULA}, got {self.curriculum!r}.")
    if not set(self.benchmark_questions) <= {"short", "long"}:
      raise ValueError(
        f"benchmark_questions must hold 'short' and/or 'long', got {self.benchmark_questions}."
      )


# ---------------------------------------------------------------------------------------------
# Reading.


class _Reader:
  """Reads rows into records, loading each map image and metro JSON once."""

  def __init__(self, options: ReasonMapOptions):
    self.options = options
    self.image_paths: dict[str, bytes] = {}
    self.images_by_hash: dict[str, bytes] = {}
    self.metros: dict[str, dict[str, list[str]]] = {}

  def roots(self, source: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(source))
    return [
      folder,
      os.path.dirname(folder),
      os.path.dirname(os.path.dirname(folder)),
      *self.options.roots,
    ]

  def figure(self, fields: Mapping[str, Any], roots: Sequence[str]) -> bytes:
    value = fields.get("figure", fields.get("image"))
    data = io.load_image_bytes(value, roots, check=False, cache=self.image_paths)
    if not isinstance(data, bytes):
      data = io.png_bytes(data)
    key = hashlib.sha1(data).hexdigest()
    if key not in self.images_by_hash:  # one copy and one check per distinct map
      if self.options.check_images:
        io.check_image_bytes(data, self.options.max_image_pixels)
      self.images_by_hash[key] = data
    return self.images_by_hash[key]

  def metro(self, fields: Mapping[str, Any], roots: Sequence[str]) -> dict[str, list[str]]:
    value = fields.get("json")
    if isinstance(value, Mapping):
      return rm.metro_lines(value)
    if isinstance(value, str) and value.lstrip().startswith("{"):
      try:
        return rm.metro_lines(json.loads(value))
      except (json.JSONDecodeError, AttributeError) as error:
        raise RecordError("bad metro JSON", str(error)) from error
    candidates = [value] if isinstance(value, str) and value else []
    candidates.append(
      os.path.join("stations", str(fields.get("country")), f"{fields.get('city')}.json")
    )
    for candidate in candidates:
      for path in (
        [candidate] if os.path.isabs(candidate) else [os.path.join(r, candidate) for r in roots]
      ):
        if path in self.metros:
          return self.metros[path]
        if os.path.isfile(path):
          try:
            with open(path, encoding="utf-8") as handle:
              lines = rm.metro_lines(json.load(handle))
          except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise RecordError("bad metro JSON", f"{path}: {error}") from error
          self.metros[path] = lines
          return lines
    raise RecordError("missing metro JSON", f"tried {candidates}")

  def records(self, row: io.Row, record_id: str) -> list[Record]:
    fields = row.fields
    roots = self.roots(row.source)
    city_difficulty = io.require(fields, "difficulty_city", str)
    if city_difficulty not in rm.CITY_DIFFICULTY_WEIGHTS:
      raise RecordError("bad field 'difficulty_city'", f"{city_difficulty!r}")
    metadata = {
      "country": str(fields.get("country") or ""),
      "city": str(fields.get("city") or ""),
      "difficulty_city": city_difficulty,
      "city_line_count": fields.get("city_line_count"),
      "city_transfer_count": fields.get("city_transfer_count"),
      "station_1": str(fields.get("station_1") or ""),
      "station_2": str(fields.get("station_2") or ""),
    }
    if "question_short" in fields or "question_long" in fields:
      return self.benchmark_records(fields, record_id, metadata, roots)
    question = fields.get("question") or fields.get("problem") or fields.get("prompt")
    if not isinstance(question, str) or not question.strip():
      raise RecordError("missing field 'question'")
    question_type = _TYPE_BY_LOWER.get(str(fields.get("type") or "").lower())
    if question_type is None:
      raise RecordError("bad field 'type'", f"{fields.get('type')!r} not in {rm.QUESTION_TYPES}")
    metadata["type"] = question_type
    answer = fields.get("answer")
    if question_type == rm.PLANNING_TYPE:
      self.planning_fields(fields, metadata, roots)
    else:
      answer = rm.as_int(answer)
      if answer is None:
        raise RecordError("bad answer", f"{fields.get('answer')!r} is not an integer")
    return [Record(record_id, (self.figure(fields, roots),), question, answer, metadata)]

  def planning_fields(
    self, fields: Mapping[str, Any], metadata: dict[str, Any], roots: Sequence[str]
  ) -> None:
    if not metadata["station_1"] or not metadata["station_2"]:
      raise RecordError("missing field 'station_1'/'station_2'")
    transfers = rm.as_int(fields.get("question_transfer_count"))
    if transfers is None or transfers < 0:
      raise RecordError(
        "bad field 'question_transfer_count'", f"{fields.get('question_transfer_count')!r}"
      )
    metadata["transfers"] = transfers
    metadata["metro"] = self.metro(fields, roots)

  def benchmark_records(self, fields, record_id, metadata, roots) -> list[Record]:
    metadata["type"] = rm.PLANNING_TYPE
    self.planning_fields(fields, metadata, roots)
    routes = fields.get("routes")
    if isinstance(routes, str):
      try:
        routes = json.loads(routes)
      except json.JSONDecodeError as error:
        raise RecordError("bad field 'routes'", str(error)) from error
    if not isinstance(routes, Mapping):
      raise RecordError("missing field 'routes'")
    metadata["routes"] = {
      k: v for k, v in routes.items() if v is not None
    }  # parquet pads missing plans
    metadata["question_long"] = str(fields.get("question_long") or "")
    figure = self.figure(fields, roots)
    records = []
    for kind in self.options.benchmark_questions:
      question = io.require(fields, f"question_{kind}", str)
      records.append(
        Record(f"{record_id}-{kind}", (figure,), question, None, dict(metadata, question_kind=kind))
      )
    return records


# ---------------------------------------------------------------------------------------------
# Prompt, reward, order, metrics.


def conversation(record: Record, system_prompt: str | None = None) -> Conversation:
  """ "<image>\\n{question}" as one user message (and the system prompt, if given)."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  content = [
    {"type": "image", "image": io.to_pil(record.images[0])},
    {"type": "text", "text": "\n" + record.prompt},
  ]
  return messages + [{"role": "user", "content": content}]


def _final_answer(completion: Any, after_think: bool) -> str:
  text = as_text(completion)
  return text.split("</think>")[-1].strip() if after_think else text


def score_record(completion: Any, record: Record, options: ReasonMapOptions) -> dict[str, float]:
  """The RewardMap reward of a completion for a record."""
  metadata = record.metadata
  return rm.reasonmap_reward(
    _final_answer(completion, options.answer_after_think),
    metadata.get("type", ""),
    record.answer,
    metadata.get("station_1", ""),
    metadata.get("station_2", ""),
    metadata.get("metro", {}),
    metadata.get("difficulty_city", ""),
    metadata.get("transfers"),
    difficulty_aware=options.difficulty_aware,
    fix_leg_count_off_by_one=options.fix_leg_count_off_by_one,
    format_bonus=options.format_bonus,
  )


def curriculum_order(records: Sequence[Record], curriculum: str, seed: int) -> list[Record]:
  """Records in RewardMap's curriculum order (module doc), each stage shuffled from `seed`."""
  if curriculum == "none":
    return list(records)
  by_type = collections.defaultdict(list)
  for record in records:
    by_type[str(record.metadata.get("type", "")).lower()].append(record)
  unknown = sorted(set(by_type) - set(_TYPE_BY_LOWER))
  if unknown:
    raise ValueError(
      f"Records with unknown types {unknown}; the curriculum knows {rm.QUESTION_TYPES}."
    )
  stages = {
    "rewardmap": [["torf1", "torf2"], ["counting2", "counting3"], ["counting1"], ["planning"]],
    "coarse": [["counting1", "counting2", "counting3", "torf1", "torf2"], ["planning"]],
    "fine": [["torf1"], ["torf2"], ["counting3"], ["counting2"], ["counting1"], ["planning"]],
  }[curriculum]
  rng = drawing.SeededRandom(seed)
  ordered = []
  for stage in stages:
    ordered.extend(rng.shuffled([r for t in stage for r in by_type[t]]))
  return ordered


def reasonmap_metrics(
  completions: Sequence[Any], records: Sequence[Record], options: ReasonMapOptions
) -> dict[str, float]:
  """ReasonMap and ReasonMap-Plus metrics, plus the mean reward.

  Returns (keys present only when such records were given):
    accuracy_short, map_score_short / accuracy_long, map_score_long, via_stops_score,
    num_via_stops_score   ReasonMap benchmark records (cal_metrics.py averages);
    accuracy_vqa and accuracy_<type>   TorF/Counting records (ReasonMap-Plus main_plus.py);
    accuracy_planning   planning records without reference routes (the reward's validity rule);
    reward   mean training reward over all records.
  """
  if len(completions) != len(records):
    raise ValueError(
      f"Got {len(completions)} completions for {len(records)} records; pass one per record."
    )
  sums, counts = collections.defaultdict(float), collections.defaultdict(int)

  def add(name: str, value: float) -> None:
    sums[name] += value
    counts[name] += 1

  for completion, record in zip(completions, records):
    metadata = record.metadata
    text = _final_answer(completion, options.answer_after_think)
    add("reward", score_record(completion, record, options)["overall"])
    kind = metadata.get("question_kind")
    if kind is not None:
      scores = rm.planning_benchmark_scores(
        text,
        kind == "long",
        metadata["station_1"],
        metadata["station_2"],
        metadata["metro"],
        metadata["routes"],
        metadata["country"],
        metadata["city"],
        metadata.get("question_long", ""),
      )
      add(f"accuracy_{kind}", scores["accuracy"])
      add(f"map_score_{kind}", scores["map_score"])
      if kind == "long":
        add("via_stops_score", scores["via_stops_score"])
        add("num_via_stops_score", scores["num_via_stops_score"])
    elif metadata.get("type") in _VQA_TYPES:
      correct = float(rm.vqa_correct(metadata["type"], rm.extract_vqa_answer(text), record.answer))
      add("accuracy_vqa", correct)
      add(f"accuracy_{metadata['type']}", correct)
    else:
      sections = rm.parse_route_sections(text)
      add(
        "accuracy_planning",
        float(
          rm.route_is_valid(
            sections,
            metadata.get("metro", {}),
            metadata.get("station_1", ""),
            metadata.get("station_2", ""),
          )
        ),
      )
  return {name: sums[name] / counts[name] for name in sorted(sums)}


# ---------------------------------------------------------------------------------------------
# Miniature: synthetic cities in the real layouts.

_STATION_NAMES = (
  "Alder",
  "Birch",
  "Cedar",
  "Dunmore",
  "Elmwood",
  "Fairview",
  "Glenbrook",
  "Harbour",
  "Ironbridge",
  "Juniper",
  "Kingsgate",
  "Larkspur",
  "Millford",
  "Northgate",
  "Oakridge",
  "Parkside",
  "Queensway",
  "Riverside",
  "Stonehill",
  "Thornton",
  "Upton",
  "Valley",
  "Westfield",
  "Yarrow",
  "Ashby",
  "Brookfield",
  "Clearwater",
  "Downs",
  "Eastgate",
  "Foxley",
  "Greenhill",
  "Hollow",
  "Innsbrook",
  "Kestrel",
)
_LINE_COLOURS = ("red", "blue", "green", "orange", "purple", "brown")
_GRID = 6  # stations sit on a _GRID x _GRID lattice


@dataclasses.dataclass(frozen=True)
class _City:
  country: str
  name: str
  lines: dict[str, list[str]]  # line -> stations in order
  positions: dict[str, tuple[int, int]]  # station -> lattice (row, column)

  @property
  def transfer_stations(self) -> set[str]:
    seen = collections.Counter(s for stations in self.lines.values() for s in stations)
    return {s for s, n in seen.items() if n > 1}

  @property
  def difficulty(self) -> str:
    return "easy" if len(self.lines) <= 2 else "middle" if len(self.lines) == 3 else "hard"


def _make_city(rng: drawing.SeededRandom, index: int) -> _City:
  """Lines along lattice rows and columns; crossings become transfer stations."""
  num_lines = rng.integer(2, 4)
  # Inner rows and columns, so every row line crosses every column line.
  rows = rng.sample(range(1, _GRID - 1), 2)
  columns = rng.sample(range(1, _GRID - 1), 2)
  axes = [("row", r) for r in rows] + [("column", c) for c in columns]
  axes = [axes[0], axes[2], axes[1], axes[3]][:num_lines]  # alternate so lines cross
  names = iter(rng.shuffled(_STATION_NAMES))
  at: dict[tuple[int, int], str] = {}
  lines = {}
  for number, (axis, fixed) in enumerate(axes, start=1):
    start = rng.integer(0, 1)
    end = rng.integer(_GRID - 2, _GRID - 1)
    cells = [(fixed, k) if axis == "row" else (k, fixed) for k in range(start, end + 1)]
    lines[f"Line {number}"] = [at.setdefault(cell, next(names)) for cell in cells]
  return _City("testland", f"city{index}", lines, {name: cell for cell, name in at.items()})


def _plans(city: _City, start: str, goal: str) -> list[list[dict[str, Any]]]:
  """Routes from start to goal with the fewest transfers (at most one here), as map-API plans."""

  def leg(line: str, a: str, b: str) -> dict[str, Any]:
    stations = city.lines[line]
    i, j = stations.index(a), stations.index(b)
    via = stations[i + 1 : j] if i < j else stations[j + 1 : i][::-1]
    return {
      "route_name": line,
      "departure_stop": a,
      "arrival_stop": b,
      "via_stops": via,
      "num_via_stops": len(via),
    }

  direct = [[leg(line, start, goal)] for line, s in city.lines.items() if start in s and goal in s]
  if direct:
    return direct
  plans = []
  for first, s1 in city.lines.items():
    for second, s2 in city.lines.items():
      if first == second or start not in s1 or goal not in s2:
        continue
      for transfer in set(s1) & set(s2):
        if transfer not in (start, goal):
          plans.append([leg(first, start, transfer), leg(second, transfer, goal)])
  return plans


def _draw_city(city: _City, size: int) -> bytes:
  image, draw = drawing.blank(size, size)
  step = size / (_GRID + 1)
  point = lambda station: (
    (city.positions[station][1] + 1) * step,
    (city.positions[station][0] + 1) * step,
  )
  label_font = drawing.font(max(8, size // 40))
  for colour, (line, stations) in zip(_LINE_COLOURS, city.lines.items()):
    draw.line([point(s) for s in stations], fill=drawing.COLOURS[colour], width=max(2, size // 90))
    x, y = point(stations[0])
    draw.text((x - step / 2, y - step / 2), line, fill=drawing.COLOURS[colour], font=label_font)
  for station in city.positions:
    x, y = point(station)
    radius = max(3, size // 80) * (1.5 if station in city.transfer_stations else 1)
    draw.ellipse(
      (x - radius, y - radius, x + radius, y + radius),
      fill=(255, 255, 255),
      outline=(0, 0, 0),
      width=2,
    )
    ImageDraw.Draw(image).text(
      (x + radius + 1, y + radius), station, fill=(0, 0, 0), font=label_font
    )
  return io.png_bytes(image)


_ROUTE_FORMAT = (
  "Answer with one section per line taken, sections separated by --, each section as:\n"
  "Route Name: <line>\nDeparture Stop: <station>\nArrival Stop: <station>"
)


def _vqa_question(rng: drawing.SeededRandom, city: _City) -> tuple[str, str, int, str, str]:
  """(type, question, answer, station_1, station_2) of a random TorF/Counting question."""
  question_type = rng.choice(_VQA_TYPES)
  line = rng.choice(sorted(city.lines))
  stations = city.lines[line]
  box = " Put the final answer in \\boxed{}."
  if question_type == "TorF1":
    station = rng.choice(sorted(city.positions))
    return (
      question_type,
      f"Is {station} a station on {line}? Answer yes or no.{box}",
      int(station in stations),
      station,
      "",
    )
  if question_type == "TorF2":
    i = rng.integer(0, len(stations) - 2)
    j = i + 1 if rng.coin() else rng.integer(0, len(stations) - 1)
    a, b = stations[i], stations[j]
    adjacent = abs(i - j) == 1
    return (
      question_type,
      f"Are {a} and {b} adjacent stations on {line}? Answer yes or no.{box}",
      int(adjacent),
      a,
      b,
    )
  if question_type == "Counting1":
    i, j = sorted(rng.sample(range(len(stations)), 2))
    between = j - i - 1
    options = rng.shuffled(sorted({between, between + 1, between + 2, abs(between - 1) + 3}))[:4]
    while len(options) < 4:
      options.append(max(options) + 1)
    letters = " ".join(f"{'ABCD'[k]}. {v}" for k, v in enumerate(options))
    question = (
      f"How many stations lie between {stations[i]} and {stations[j]} on {line}? {letters}.{box}"
    )
    return question_type, question, options.index(between), stations[i], stations[j]
  if question_type == "Counting2":
    station = rng.choice(sorted(city.positions))
    count = sum(station in s for s in city.lines.values())
    return question_type, f"How many lines pass through {station}?{box}", count, station, ""
  return (
    question_type,
    f"How many stations does {line} have?{box}",
    len(stations),
    stations[0],
    stations[-1],
  )


def write_reasonmap_miniature(
  out_dir: str, n: int, seed: int, options: ReasonMapOptions = ReasonMapOptions()
) -> str:
  """Writes synthetic cities (maps/, stations/) and n rows each of ReasonMap-Train, ReasonMap-Plus
  and ReasonMap in their parquet layouts; returns the ReasonMap-Train parquet path."""
  rng = drawing.SeededRandom(seed)
  cities = [_make_city(rng, k) for k in range(2)]
  city_rows = {}
  for city in cities:
    map_path = f"maps/{city.country}/{city.name}.png"
    json_path = f"stations/{city.country}/{city.name}.json"
    os.makedirs(os.path.join(out_dir, os.path.dirname(map_path)), exist_ok=True)
    os.makedirs(os.path.join(out_dir, os.path.dirname(json_path)), exist_ok=True)
    image = _draw_city(city, options.miniature_image_size)
    with open(os.path.join(out_dir, map_path), "wb") as handle:
      handle.write(image)
    transfers = city.transfer_stations
    annotated = {
      line: [s + (" (Transfer Station)" if s in transfers else "") for s in stations]
      for line, stations in city.lines.items()
    }
    with open(os.path.join(out_dir, json_path), "w", encoding="utf-8") as handle:
      json.dump(annotated, handle, ensure_ascii=False, indent=2)
    city_rows[city.name] = {
      "country": city.country,
      "city": city.name,
      "figure": map_path,
      "difficulty_city": city.difficulty,
      "city_line_count": len(city.lines),
      "city_transfer_count": len(transfers),
      "json": json_path,
      "image": image,
    }

  def planning_sample(city: _City):
    for _ in range(100):
      start, goal = rng.sample(sorted(city.positions), 2)
      plans = _plans(city, start, goal)
      if plans:
        return start, goal, plans
    raise RuntimeError("No connected station pair in a synthetic city.")

  train, plus, bench = [], [], []
  for index in range(n):
    city = cities[index % len(cities)]
    base = {k: v for k, v in city_rows[city.name].items() if k != "image"}
    if index % 3 == 2:
      start, goal, plans = planning_sample(city)
      question = f"Plan a metro route from {start} to {goal}. {_ROUTE_FORMAT}"
      train.append(
        dict(
          base,
          question=question,
          type="planning",
          answer=None,
          station_1=start,
          station_2=goal,
          question_transfer_count=len(plans[0]) - 1,
        )
      )
    else:
      question_type, question, answer, a, b = _vqa_question(rng, city)
      row = dict(
        base,
        question=question,
        type=question_type,
        answer=answer,
        station_1=a,
        station_2=b,
        question_transfer_count=None,
      )
      train.append(row)
    question_type, question, answer, a, b = _vqa_question(rng, city)
    plus.append(
      {
        k: v
        for k, v in dict(
          base, question=question, type=question_type, answer=answer, station_1=a, station_2=b
        ).items()
        if k != "json"
      }
    )
    start, goal, plans = planning_sample(city)
    long_field = "Number of Via Stops" if rng.coin() else "Via Stops"
    bench.append(
      dict(
        {k: v for k, v in base.items() if k not in ("figure", "json")},
        figure=base64.b64encode(city_rows[city.name]["image"]).decode("ascii"),
        question_short=f"Plan a metro route from {start} to {goal}. {_ROUTE_FORMAT}",
        question_long=f"Plan a metro route from {start} to {goal}. {_ROUTE_FORMAT}\n{long_field}: <value>",
        station_1=start,
        station_2=goal,
        routes=json.dumps({f"plan_{k}": p for k, p in enumerate(plans)}),
        difficulty_question="easy" if len(plans[0]) == 1 else "middle",
        question_transfer_count=len(plans[0]) - 1,
      )
    )
  io.write_parquet(
    os.path.join(out_dir, "ReasonMap-Plus", "data", "test-00000-of-00001.parquet"), plus
  )
  io.write_parquet(
    os.path.join(out_dir, "ReasonMap", "data", "validation-00000-of-00001.parquet"), bench
  )
  return io.write_parquet(
    os.path.join(out_dir, "ReasonMap-Train", "data", "train-00000-of-00001.parquet"), train
  )


# ---------------------------------------------------------------------------------------------


def make_reasonmap_task(**overrides: Any) -> Task:
  options = make_options(ReasonMapOptions, "reasonmap", overrides)
  return Task(
    name="reasonmap",
    options=options,
    read=lambda path, stats=None: io.read_records(path, stats, _Reader(options).records),
    build_conversation=lambda record: conversation(record, options.system_prompt),
    score=guard_score(
      "reasonmap", lambda completion, record: score_record(completion, record, options)
    ),
    evaluate=lambda completions, records: reasonmap_metrics(completions, records, options),
    write_miniature=lambda out_dir, n, seed: write_reasonmap_miniature(out_dir, n, seed, options),
    order=lambda records, seed: curriculum_order(records, options.curriculum, seed),
    shuffle=options.curriculum == "none",
  )


TASK_FACTORIES = {"reasonmap": make_reasonmap_task}
