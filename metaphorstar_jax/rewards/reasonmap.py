"""RewardMap / ReasonMap scorers for transit-map questions (specs/seed_methods.md §2.5, §2.6).

Training reward, as fscdc/RewardMap verl/utils/reward_score/reason_map.py computes it:

  score = weight * (10 * correct + 0.5 * detail)

* TorF / Counting questions: the answer is the last `\\boxed{}` content, else the text after
  "the (final/correct) answer is / should be", run through ReasonMap's `find_math_answer`.
  TorF: "yes"/"no" against ground truth 1/0. Counting1: letter A-D against index 0-3.
  Counting2/3: integer equality. Their detail is 0 (the Counting1 stop-list detail is coded but
  unused in the release).
* Planning: the whole completion is split on "--" into sections with "Route Name: ...\\n",
  "Departure Stop: ...\\n" and "Arrival Stop: ..." (the rest of the section). It is correct when
  the first departure is station_1, the last arrival is station_2, every route name is a line of
  the city's metro JSON with both its stops on it, and each arrival is the next departure.
  Detail (capped at 10, not floored): +2 for right endpoints; per leg -5 when the leg index
  exceeds the allowed count, +4 (0-transfer questions, on a line serving both endpoints) or +3
  (questions with transfers) for a real line, +1 per continuous transfer within the allowed count.
* weight ("difficulty_aware", hard-coded in the release): city easy 1.0 / middle 1.2 / hard 1.5,
  plus 0.5 for planning questions with at least one transfer. Max about (10 + 5) * 2.0 = 30.

The release's leg check is `(i + 1) > question_transfer_count` with a 0-based i, so even a minimal
correct route (transfers + 1 legs) loses 5 on its last leg. We reproduce it by default;
`fix_leg_count_off_by_one=True` uses the intended `(i + 1) > question_transfer_count + 1`.

The release has no format term; `format_bonus` (default 0) optionally adds one for a parseable
answer. Station names are normalised with the release's `clean_string` (strips "Metro",
"Station", brackets, spaces and hyphens, lower-cases, and a few aliases), applied twice where the
release applies it twice.

Benchmark scoring (fscdc/ReasonMap main.py, tools.py) uses a plainer `clean_string` and, for each
planning question, `accuracy` (the same validity rule) and a `map score` against the map-API
reference plans, best over plans: short questions +1 for right endpoints and per leg +2 route
name, +1 departure, +1 arrival, capped at 10, +10 if correct; long questions add the via-stop
score ((IoU * 10 + matched stops, capped 10) / 2) or the number-of-via-stops score (4 per exact
leg, linear partial credit, capped 10), capped at 20, +20 if correct. The release's quirks are
kept and noted where they occur.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from metaphorstar_jax.rewards.tags import as_text

TORF_TYPES = ("TorF1", "TorF2")
COUNTING_TYPES = ("Counting1", "Counting2", "Counting3")
PLANNING_TYPE = "planning"
QUESTION_TYPES = TORF_TYPES + COUNTING_TYPES + (PLANNING_TYPE,)
CITY_DIFFICULTY_WEIGHTS = {"easy": 1.0, "middle": 1.2, "hard": 1.5}
TRANSFER_WEIGHT_BONUS = 0.5
CORRECT_SCORE = 10.0
DETAIL_WEIGHT = 0.5
MAX_DETAIL = 10.0
MCQ_LETTERS = {"a": 0, "b": 1, "c": 2, "d": 3}
ANSWER_FLAGS = (
  "the final answer is",
  "the answer is",
  "the correct answer is",
  "the answer should be",
)
STATION_ANNOTATIONS = (
  "（换乘站）",
  "（支线起始站）",
  " (Transfer Station)",
  " (Branch-starting Station)",
)
LINE_ALIASES = (("八通", "Line 1"), ("大兴", "Line 4"))  # Beijing branch lines share a main line
SHORT_MAP_CAP, LONG_MAP_CAP = 10.0, 20.0
VIA_STOP_CAP = 10.0
NUM_VIA_STOP_POINTS = 4.0

_SPACES_AND_HYPHENS = re.compile(r"[\s\-]+")
_DIGITS = re.compile(r"\d+")
_APP_LINE_NUMBER = re.compile(r"(\d+)")
_APP_PARENTHESISED = re.compile(r"\(.*?\)")
_ROUTE_NAME_PATTERNS = (  # ReasonMap main.py, non-China cities, first match wins
  re.compile(r"Metro\s+([A-Z0-9]{1,2})[-\s]?Line", re.IGNORECASE),
  re.compile(r"Metro\s+([A-Z0-9]{1,2})", re.IGNORECASE),
  re.compile(r"Linea\s+([A-Z0-9]{1,2})", re.IGNORECASE),
  re.compile(r"([A-Z0-9]{1,2})", re.IGNORECASE),
)


# ---------------------------------------------------------------------------------------------
# Station names.


def _next_of(text: str, chars: str, start: int, cache: dict[str, int]) -> int:
  """Index of the first of `chars` at or after `start`, or -1. `cache` keeps each char's last
  position found, so repeated calls with growing `start` scan the text once in all."""
  positions = []
  for char in chars:
    known = cache.get(char)
    if known is None or (known != -1 and known < start):
      known = cache[char] = text.find(char, start)
    if known != -1:
      positions.append(known)
  return min(positions, default=-1)


def _drop_bracketed(text: str) -> str:
  """`re.sub(r"[\\(\\（][^\\)\\）]*[\\)\\）]", "", text)` in linear time."""
  pieces, position = [], 0
  openings, closings = {}, {}
  while True:
    opening = _next_of(text, "(（", position, openings)
    if opening == -1:
      break
    closing = _next_of(text, ")）", opening, closings)
    if closing == -1:
      break  # no later bracket can close either
    pieces.append(text[position:opening])
    position = closing + 1
  pieces.append(text[position:])
  return "".join(pieces)


def clean_station_name(name: Any) -> str:
  """RewardMap's `clean_string`: the station-name normaliser of the training reward."""
  text = as_text(name)
  for old, new in (
    ("Metro", ""),
    ("metro", ""),
    (",", ""),
    ("*", ""),
    ("\n", ""),
    ("'", ""),
    ("Univ.", "University"),
    ("Univ", "University"),
    ("Tech.", "Technology"),
    ("Tech", "Technology"),
    ("road", "lu"),
    ("Road", "lu"),
    ("Station", ""),
    ("station", ""),
    ("Asian Games Village", "yayuncun"),
  ):
    text = text.replace(old, new)
  if text.endswith("站"):
    text = text[:-1]
  return _SPACES_AND_HYPHENS.sub("", _drop_bracketed(text)).lower()


def clean_station_name_eval(name: Any) -> str:
  """ReasonMap's `clean_string` (tools.py): the plainer normaliser of the benchmark metrics."""
  text = as_text(name)
  for old in ("Metro", "metro", ",", "*", "\n"):
    text = text.replace(old, "")
  return _SPACES_AND_HYPHENS.sub("", _drop_bracketed(text)).lower()


def strip_station_annotations(name: str) -> str:
  """Drops the "(Transfer Station)"-style notes the metro JSONs attach to station names."""
  for note in STATION_ANNOTATIONS:
    name = name.replace(note, "")
  return name


def metro_lines(raw: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  """A city's metro JSON ({line name: [station, ...]}) with station annotations removed."""
  return {
    str(line): [strip_station_annotations(str(s)) for s in stations]
    for line, stations in raw.items()
  }


# ---------------------------------------------------------------------------------------------
# TorF / Counting answers.


def _strip_math_string(text: str) -> str:
  """ReasonMap's copy of the MATH normaliser (reasonmap_utils._strip_string; differs from
  mathruler's: drops `$`, splits on `=`/`\\approx` unconditionally, fixes fractions only when
  "sqrt" occurs)."""
  text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  text = text.replace("tfrac", "frac").replace("dfrac", "frac")
  text = text.replace("\\left", "").replace("\\right", "")
  text = text.replace("^{\\circ}", "").replace("^\\circ", "")
  text = text.replace("\\$", "").replace("$", "")
  text = text.split("\\text{ ")[0]
  text = text.replace("\\%", "")
  text = text.replace(" .", " 0.").replace("{.", "{0.")
  if not text:
    return text
  if text[0] == ".":
    text = "0" + text
  if len(text.split("=")) == 2:
    text = text.split("=")[-1]
  if len(text.split("\\approx")) == 2:
    text = text.split("\\approx")[-1]
  if "sqrt" in text:
    pieces = text.split("\\sqrt")
    text = pieces[0] + "".join(
      "\\sqrt{" + piece[0] + "}" + piece[1:] if piece and piece[0] != "{" else "\\sqrt" + piece
      for piece in pieces[1:]
    )
  text = text.replace(" ", "")
  if "sqrt" in text:
    text = _fix_fractions(text)
  if text == "0.5":
    text = "\\frac{1}{2}"
  parts = text.split("/")
  if len(parts) == 2:
    try:
      numerator, denominator = int(parts[0]), int(parts[1])
      if text == f"{numerator}/{denominator}":
        text = "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"
    except ValueError:
      pass
  return text


def _fix_fractions(text: str) -> str:
  pieces = text.split("\\frac")
  fixed = pieces[0]
  for piece in pieces[1:]:
    fixed += "\\frac"
    if piece and piece[0] == "{":
      fixed += piece
      continue
    if len(piece) < 2:
      return text
    numerator, second = piece[0], piece[1]
    fixed += "{" + numerator + "}" + ("{" + second + "}" if second != "{" else second) + piece[2:]
  return fixed


def find_math_answer(text: str) -> str:
  """ReasonMap's `find_math_answer`: last `\\boxed{...}` content (greedy), cleaned of LaTeX."""
  text = text.lower()
  if "{}" in text:
    text = text.replace("{}", "")
  # `re.findall("oxed{(.*)}", text, re.S)[-1]` in linear time: the greedy match runs from the
  # first "oxed{" to the last "}".
  start, last_brace = text.find("oxed{"), text.rfind("}")
  answer = text[start + 5 : last_brace] if start != -1 and last_brace >= start + 5 else text
  first_close, first_open = answer.find("}"), answer.find("{")
  if first_close != -1 and (first_open == -1 or first_close < first_open):
    answer = answer.split("}")[0]
  answer = answer.split("=")[-1].split("\\approx")[-1]
  for old, new in (
    (" ", ""),
    ("\\,", ""),
    ("∞", "\\infty"),
    ("+\\infty", "\\infty"),
    ("\\\\", "\\"),
    ("\n", ""),
    ("\\text", ""),
    ("\\mbox", ""),
    ("bmatrix", "pmatrix"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("{m}^3", ""),
    ("m^3", ""),
    ("{units}", ""),
    ("units", ""),
    ("{km}", ""),
    ("km", ""),
  ):
    answer = answer.replace(old, new)
  return _strip_math_string(answer)


def extract_vqa_answer(completion: Any) -> str:
  """The answer string a TorF/Counting completion gives, as the release extracts it."""
  answer = as_text(completion)
  if "oxed{" not in answer:
    for flag in ANSWER_FLAGS:
      for variant in (flag, flag.replace("the", "The")):
        had_flag = variant in answer
        answer = answer.split(variant)[-1].strip()
        if had_flag:
          answer = answer.split("\n")[0].split(". ")[0]
  elif answer.count("oxed{") > 1:
    answer = "\\boxed{" + answer.split("oxed{")[-1]
  return find_math_answer(answer).rstrip(".").lstrip(":").strip()


def as_int(value: Any) -> int | None:
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return int(value) if math.isfinite(value) and value == int(value) else None
  if isinstance(value, str):
    try:
      return int(value.strip())
    except ValueError:
      return None
  try:  # numpy integers and the like
    return int(value)
  except (TypeError, ValueError, OverflowError):
    return None


def vqa_correct(question_type: str, answer: str, ground_truth: Any) -> bool:
  """Whether an extracted TorF/Counting answer is right (ground truth: 1/0, 0-3, or a count)."""
  truth = as_int(ground_truth)
  if truth is None:
    return False
  if "TorF" in question_type:
    return answer.lower() == ("yes" if truth == 1 else "no")
  if question_type in ("Counting2", "Counting3"):
    try:
      return int(answer) == truth
    except ValueError:
      return False
  if question_type == "Counting1":
    return MCQ_LETTERS.get(answer.lower()) == truth
  return False


# ---------------------------------------------------------------------------------------------
# Route plans.


@dataclasses.dataclass(frozen=True)
class RouteSection:
  """One leg of a planned route, as parsed from a completion (stops already normalised)."""

  line: str
  departure: str
  arrival: str
  via_stops: str | None = None  # long questions: the text after "Via Stops: "
  num_via_stops: str | None = None  # long questions: the text after "Number of Via Stops: "


def _line_value(section: str, label: str) -> str | None:
  """`re.search(label + "(.*?)\\n", section).group(1)`, or None (no newline after the label)."""
  start = section.find(label)
  if start == -1:
    return None
  end = section.find("\n", start + len(label))
  return None if end == -1 else section[start + len(label) : end]


def parse_route_sections(
  text: str,
  cleaner=clean_station_name,
  labels_any_case: bool = False,
  arrival_to_line_end: bool = False,
  via_field: str | None = None,
) -> list[RouteSection]:
  """Splits a planning answer on "--" into legs.

  Args:
    text: the completion.
    cleaner: station-name normaliser applied to the parsed stops.
    labels_any_case: accept a section whose labels appear only in lower case (the release's
      detail reward does; its values are still read with the exact-case labels).
    arrival_to_line_end: read the arrival like the other fields, up to a newline (ReasonMap long
      questions); otherwise it is the rest of the section after "Arrival Stop:".
    via_field: "Via Stops" or "Number of Via Stops" to also keep that field (long questions).

  Returns:
    the legs in order; sections missing a label are skipped, missing values read "Wrong".
  """
  sections = []
  for section in text.split("--"):
    if not section.strip():
      continue
    probe = section.lower() if labels_any_case else section
    labels = (
      ("route name:", "departure stop:", "arrival stop:")
      if labels_any_case
      else ("Route Name:", "Departure Stop:", "Arrival Stop:")
    )
    if not all(label in probe for label in labels):
      continue
    line = _line_value(section, "Route Name: ")
    departure = _line_value(section, "Departure Stop: ")
    if arrival_to_line_end:
      arrival = _line_value(section, "Arrival Stop: ")
      arrival = cleaner(arrival) if arrival is not None else "Wrong"
    else:
      arrival = cleaner(section.split("Arrival Stop:")[-1].strip())
    via = None
    if via_field is not None:
      via = section.split(f"{via_field}: ")[-1].strip()
    sections.append(
      RouteSection(
        line=line.strip() if line is not None else "Wrong",
        departure=cleaner(departure) if departure is not None else "Wrong",
        arrival=arrival,
        via_stops=via if via_field == "Via Stops" else None,
        num_via_stops=via if via_field == "Number of Via Stops" else None,
      )
    )
  return sections


def _line_key(name: str) -> str:
  for marker, line in LINE_ALIASES:
    if marker in name:
      name = line
  return name


def endpoints_match(
  sections: Sequence[RouteSection], station_1: str, station_2: str, cleaner
) -> bool:
  """First departure is station_1 and last arrival is station_2 (stops cleaned again, as the release)."""
  return bool(sections) and (
    cleaner(sections[0].departure) == cleaner(station_1)
    and cleaner(sections[-1].arrival) == cleaner(station_2)
  )


def route_is_valid(
  sections: Sequence[RouteSection],
  metro: Mapping[str, Sequence[str]],
  station_1: str,
  station_2: str,
  cleaner=clean_station_name,
) -> bool:
  """The release's correctness rule for a planned route (module doc)."""
  if not endpoints_match(sections, station_1, station_2, cleaner):
    return False
  line_stops = {}
  for index, section in enumerate(sections):
    line = _line_key(section.line)
    if line not in metro:
      return False
    if line not in line_stops:
      line_stops[line] = {cleaner(s) for s in metro[line]}
    stops = line_stops[line]
    arrival = cleaner(section.arrival)
    if cleaner(section.departure) not in stops or arrival not in stops:
      return False
    if index < len(sections) - 1 and arrival != cleaner(sections[index + 1].departure):
      return False
  return True


def planning_detail_score(
  sections: Sequence[RouteSection],
  metro: Mapping[str, Sequence[str]],
  station_1: str,
  station_2: str,
  transfers: int,
  fix_leg_count_off_by_one: bool = False,
) -> float:
  """The release's planning detail reward (module doc), capped at MAX_DETAIL, possibly negative."""
  if not endpoints_match(sections, station_1, station_2, clean_station_name):
    return 0.0
  allowed_legs = transfers + 1 if fix_leg_count_off_by_one else transfers
  score = 2.0
  start, end = clean_station_name(station_1), clean_station_name(station_2)
  line_stops = {}
  for index, section in enumerate(sections):
    if index + 1 > allowed_legs:
      score -= 5.0
    line = _line_key(section.line)
    if line not in metro:
      continue
    if line not in line_stops:
      line_stops[line] = {clean_station_name(s) for s in metro[line]}
    stops = line_stops[line]
    if transfers == 0:
      if start in stops and end in stops:
        score += 4.0
    else:
      score += 3.0
    arrival = clean_station_name(section.arrival)
    if clean_station_name(section.departure) in stops and arrival in stops:
      is_transfer = index < len(sections) - 1
      if is_transfer and arrival == clean_station_name(sections[index + 1].departure):
        if index + 1 <= transfers:
          score += 1.0
  return min(score, MAX_DETAIL)


def difficulty_weight(
  question_type: str, transfers: int | None, city_difficulty: str
) -> float | None:
  """The release's "difficulty_aware" weight, or None where it would raise (unknown values)."""
  city_weight = CITY_DIFFICULTY_WEIGHTS.get(city_difficulty)
  if city_weight is None:
    return None
  if "TorF" in question_type or "Counting" in question_type:
    return city_weight
  if "planning" in question_type:
    if transfers is None or transfers < 0:
      return None
    return city_weight + (TRANSFER_WEIGHT_BONUS if transfers > 0 else 0.0)
  return None


def reasonmap_reward(
  completion: Any,
  question_type: str,
  answer: Any,
  station_1: str,
  station_2: str,
  metro: Mapping[str, Sequence[str]],
  city_difficulty: str,
  transfers: Any,
  difficulty_aware: bool = True,
  fix_leg_count_off_by_one: bool = False,
  format_bonus: float = 0.0,
) -> dict[str, float]:
  """The RewardMap reward of one completion.

  Args:
    completion: the decoded response text.
    question_type: one of QUESTION_TYPES.
    answer: ground truth for TorF (1 yes / 0 no) and Counting (0-3 for Counting1, else a count);
      unused for planning.
    station_1, station_2: the question's endpoints.
    metro: {line name: [station, ...]} of the city, annotations stripped (`metro_lines`).
    city_difficulty: "easy", "middle" or "hard".
    transfers: the question's transfer count (planning).
    difficulty_aware: multiply by `difficulty_weight` (the release); False is its "baseline" mode.
    fix_leg_count_off_by_one: use the corrected leg-count penalty (module doc).
    format_bonus: added (before weighting) when the answer parses; 0 in the release.

  Returns:
    {"overall", "accuracy", "detail", "weight", "format"}, floats. Unknown difficulty or type
    gives weight 1.0 (the release raises).
  """
  text = as_text(completion)
  question_type = as_text(question_type)
  transfer_count = as_int(transfers)
  correct, detail, parsed = False, 0.0, False
  if "TorF" in question_type or "Counting" in question_type:
    extracted = extract_vqa_answer(text)
    parsed = bool(extracted)
    correct = vqa_correct(question_type, extracted, answer)
  elif "planning" in question_type:
    correct = route_is_valid(parse_route_sections(text), metro, station_1, station_2)
    detail_sections = parse_route_sections(text, labels_any_case=True)
    parsed = bool(detail_sections)
    if question_type == PLANNING_TYPE:
      detail = planning_detail_score(
        detail_sections, metro, station_1, station_2, transfer_count or 0, fix_leg_count_off_by_one
      )
  score = CORRECT_SCORE * correct + DETAIL_WEIGHT * detail + format_bonus * parsed
  weight = 1.0
  if difficulty_aware:
    weight = difficulty_weight(question_type, transfer_count, as_text(city_difficulty)) or 1.0
  return {
    "overall": score * weight,
    "accuracy": float(correct),
    "detail": detail,
    "weight": weight,
    "format": float(parsed),
  }


# ---------------------------------------------------------------------------------------------
# Benchmark metrics (ReasonMap main.py).


def _app_line_name(
  app_section: Mapping[str, Any], answer_line: str, country: str, city: str
) -> str:
  if country == "china":
    name = as_text(app_section.get("route_name", ""))
    number = _APP_LINE_NUMBER.search(name)
    if number:
      return "Line " + str(int(number.group(1)))
    return _APP_PARENTHESISED.sub("", name).replace("地铁", "")
  # Quirk kept from the release: outside China the "reference" line name is derived from the
  # answer's own line name, and the one- or two-character pattern catches any ASCII letter or
  # digit first, so the city-specific rules after it never fire.
  for pattern in _ROUTE_NAME_PATTERNS:
    match = pattern.search(answer_line)
    if match:
      value = match.group(1)
      if pattern is _ROUTE_NAME_PATTERNS[-1] and value == "B1" and city == "rome":
        value = "B"
      return "Line " + value
  return answer_line


def _app_stops(
  app_section: Mapping[str, Any], country: str, long_question: bool
) -> tuple[str, str]:
  suffix = "站" if country == "china" else " Station"
  departure = as_text(app_section.get("departure_stop", ""))
  arrival = as_text(app_section.get("arrival_stop", ""))
  app_departure = departure if departure.endswith(suffix.strip()) else departure + suffix
  if long_question and country == "china":
    app_arrival = arrival if arrival.endswith(suffix) else arrival + suffix
  else:
    # Quirk kept from the release: the suffix test looks at the departure stop, and when it
    # already ends with the suffix the departure stop is used as the arrival.
    app_arrival = departure if departure.endswith(suffix.strip()) else arrival + suffix
  return app_departure, app_arrival


def _plan_sections(plan: Any) -> list[Mapping[str, Any]]:
  if isinstance(plan, Mapping):
    plan = list(plan.values())
  if not isinstance(plan, Sequence) or isinstance(plan, (str, bytes)):
    return []
  return [section for section in plan if isinstance(section, Mapping)]


def _num_via_stop_points(answered: str | None, reference: Any) -> float:
  match = _DIGITS.search(answered or "")
  try:
    answered_count = int(match.group()) if match else 0
    reference_count = int(reference)
  except (TypeError, ValueError, OverflowError):
    return 0.0
  error = abs(answered_count - reference_count)
  if error == 0:
    return NUM_VIA_STOP_POINTS
  if reference_count == 0:
    return 0.0
  return max(0.0, NUM_VIA_STOP_POINTS - error / reference_count * NUM_VIA_STOP_POINTS)


def planning_benchmark_scores(
  completion: Any,
  long_question: bool,
  station_1: str,
  station_2: str,
  metro: Mapping[str, Sequence[str]],
  reference_routes: Mapping[str, Any],
  country: str,
  city: str,
  question: str = "",
) -> dict[str, float]:
  """ReasonMap's accuracy and map score of one planning answer.

  Args:
    completion: the model's final answer text.
    long_question: the long question (also asks for via stops or their number).
    station_1, station_2, metro: as in `reasonmap_reward`.
    reference_routes: the sample's `routes`, {plan name: [{"route_name", "departure_stop",
      "arrival_stop", "via_stops", "num_via_stops"}, ...]}.
    country, city: the sample's; China uses the Chinese reference names.
    question: the long question text; it decides between "Number of Via Stops" and "Via Stops".

  Returns:
    {"accuracy", "map_score", "departure_arrival_score", "route_name_score", "stops_score",
     "via_stops_score", "num_via_stops_score"}; the last two stay 0 for short questions.
  """
  text, country, city = as_text(completion), as_text(country), as_text(city)
  via_field = None
  if long_question:
    via_field = (
      "Number of Via Stops" if "Number of Via Stops:" in as_text(question) else "Via Stops"
    )
  sections = parse_route_sections(
    text, cleaner=clean_station_name_eval, arrival_to_line_end=long_question, via_field=via_field
  )
  zeros = dict.fromkeys(
    (
      "accuracy",
      "map_score",
      "departure_arrival_score",
      "route_name_score",
      "stops_score",
      "via_stops_score",
      "num_via_stops_score",
    ),
    0.0,
  )
  if not sections:
    return zeros
  clean = clean_station_name_eval
  accurate = route_is_valid(sections, metro, station_1, station_2, clean)
  endpoints = endpoints_match(sections, station_1, station_2, clean)
  cap, bonus = (LONG_MAP_CAP, LONG_MAP_CAP) if long_question else (SHORT_MAP_CAP, SHORT_MAP_CAP)
  best = dict(zeros, accuracy=float(accurate))
  plans = reference_routes.values() if isinstance(reference_routes, Mapping) else []
  for plan in plans:
    scores = dict(zeros, accuracy=float(accurate))
    total = 0.0
    if endpoints:
      total += 1.0
      scores["departure_arrival_score"] = 1.0
      via_matches, num_via_points = 0.0, 0.0
      union, intersection = set(), set()
      for section, app_section in zip(sections, _plan_sections(plan)):
        app_line = _app_line_name(app_section, section.line, country, city)
        app_departure, app_arrival = _app_stops(app_section, country, long_question)
        if clean(app_line) == clean(section.line):
          total += 2.0
          scores["route_name_score"] += 2.0
        if clean(app_departure) == clean(section.departure):
          total += 1.0
          scores["stops_score"] += 1.0
        if clean(app_arrival) == clean(section.arrival):
          total += 1.0
          scores["stops_score"] += 1.0
        if not long_question:
          continue
        if section.num_via_stops is not None:
          num_via_points += _num_via_stop_points(
            section.num_via_stops, app_section.get("num_via_stops")
          )
          continue
        answered = section.via_stops.split(",") if "站" in (section.via_stops or "") else []
        # The release only builds the reference via-stop list for Chinese cities.
        app_via = []
        if country == "china":
          app_via = [
            as_text(v) if as_text(v).endswith("站") else as_text(v) + "站"
            for v in app_section.get("via_stops") or []
          ]
        via_matches += sum(stop in app_via for stop in answered)
        if clean(section.line) == clean(app_line):
          union.update(app_via, answered)
          intersection.update(set(app_via) & set(answered))
      if long_question:
        via_matches, num_via_points = (
          min(VIA_STOP_CAP, via_matches),
          min(VIA_STOP_CAP, num_via_points),
        )
        iou = len(intersection) / len(union) if union else 0.0
        scores["via_stops_score"] = (iou * 10 + via_matches) / 2
        scores["num_via_stops_score"] = num_via_points
        total += scores["via_stops_score"] + num_via_points
    total = min(cap, total) + (bonus if accurate else 0.0)
    scores["map_score"] = total
    if total >= best["map_score"]:
      best = scores
  return best
