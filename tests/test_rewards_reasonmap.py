"""metaphorstar_jax.rewards.reasonmap: the RewardMap reward and ReasonMap metrics on a hand-made map.

Expected scores are worked out by hand from fscdc/RewardMap verl/utils/reward_score/reason_map.py
and fscdc/ReasonMap main.py (specs/seed_methods.md §2.5, §2.6).
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaphorstar_jax.rewards import reasonmap as rm

# Four lines; Birch, Dover, Harbor and Jade are transfer stations.
METRO = rm.metro_lines(
  {
    "Line 1": [
      "Alder Station",
      "Birch Station (Transfer Station)",
      "Cedar Station",
      "Dover Station (Transfer Station)",
      "Elm Station",
    ],
    "Line 2": [
      "Fir Station",
      "Birch Station (Transfer Station)",
      "Grove Station",
      "Harbor Station (Transfer Station)",
    ],
    "Line 3": [
      "Dover Station (Transfer Station)",
      "Iris Station",
      "Harbor Station (Transfer Station)",
      "Jade Station (Transfer Station)",
    ],
    "Line 4": ["Jade Station (Transfer Station)", "Kiln Station", "Lark Station"],
  }
)
# question name -> (station_1, station_2, transfers, city difficulty, weight)
QUESTIONS = {
  "direct": ("Alder Station", "Cedar Station", 0, "easy", 1.0),
  "one_transfer": ("Alder Station", "Grove Station", 1, "middle", 1.7),
  "two_transfers": ("Alder Station", "Lark Station", 2, "hard", 2.0),
}


def route(*legs, tail=""):
  return (
    "--\n".join(
      f"Route Name: {line}\nDeparture Stop: {a}\nArrival Stop: {b}\n" for line, a, b in legs
    )
    + tail
  )


# (question, answer, correct, detail as released, detail with the corrected leg rule)
ROUTES = [
  ("direct", route(("Line 1", "Alder", "Cedar")), 1, 1, 6),
  ("direct", route(("Line 2", "Alder", "Cedar")), 0, -3, 2),  # wrong line
  ("direct", route(("Line 1", "Alder", "Dover")), 0, 0, 0),  # wrong arrival stop
  ("direct", route(("Line 9", "Alder", "Cedar")), 0, -3, 2),  # a line the city lacks
  (
    "direct",
    route(("Line 1", "Alder", "Birch"), ("Line 1", "Birch", "Cedar")),
    1,
    0,
    5,
  ),  # too many legs
  ("direct", "Take Line 1 from Alder to Cedar.", 0, 0, 0),  # unparseable
  (
    "direct",
    "route name: Line 1\ndeparture stop: Alder\narrival stop: Cedar",
    0,
    0,
    0,
  ),  # lower-case labels
  ("direct", route(("Line 1", "alder station", "CEDAR")), 1, 1, 6),  # names are normalised
  (
    "direct",
    route(("Line 1", "Alder", "Cedar"), tail="This takes 2 stops."),
    0,
    0,
    0,
  ),  # trailing text
  (
    "direct",
    route(("Line 1", "Alder", "Cedar"), tail="--\nTotal: 2 stops."),
    1,
    1,
    6,
  ),  # label-less section
  ("direct", "Route Name: Line 1 Departure Stop: Alder Arrival Stop: Cedar", 0, 0, 0),  # one line
  ("direct", "Here is my plan.\n" + route(("Line 1", "Alder", "Cedar")), 1, 1, 6),  # preamble
  ("one_transfer", route(("Line 1", "Alder", "Birch"), ("Line 2", "Birch", "Grove")), 1, 4, 9),
  ("one_transfer", route(("Line 1", "Alder", "Grove")), 0, 5, 5),  # missing transfer
  (
    "one_transfer",
    route(("Line 1", "Alder", "Cedar"), ("Line 2", "Birch", "Grove")),
    0,
    3,
    8,
  ),  # broken transfer
  (
    "one_transfer",
    route(("Line 1", "Alder", "Birch"), ("Line 3", "Birch", "Grove")),
    0,
    4,
    9,
  ),  # wrong 2nd line
  (
    "one_transfer",
    route(("Line 1", "Cedar", "Birch"), ("Line 2", "Birch", "Grove")),
    0,
    0,
    0,
  ),  # wrong start
  (
    "one_transfer",
    route(
      ("Line 1", "Alder", "Birch"), ("Line 2", "Birch", "Harbor"), ("Line 2", "Harbor", "Grove")
    ),
    1,
    2,
    7,
  ),  # too many legs
  (
    "one_transfer",
    route(
      ("Line 1", "Alder", "Birch Station (Transfer Station)"),
      ("Line 2", "Birch Station (Transfer Station)", "Grove"),
    ),
    1,
    4,
    9,
  ),
  ("one_transfer", route(("Line 1", "Al-der", "Birch"), ("Line 2", "Birch", "Grove")), 1, 4, 9),
  (
    "one_transfer",
    route(("line 1", "Alder", "Birch"), ("Line 2", "Birch", "Grove")),
    0,
    0,
    5,
  ),  # line case
  (
    "two_transfers",
    route(("Line 1", "Alder", "Dover"), ("Line 3", "Dover", "Jade"), ("Line 4", "Jade", "Lark")),
    1,
    8,
    10,
  ),  # the corrected detail, 13, is capped at 10
  (
    "two_transfers",
    route(("Line 1", "Alder", "Dover"), ("Line 3", "Dover", "Lark")),
    0,
    9,
    9,
  ),  # missing leg
  ("two_transfers", "", 0, 0, 0),
  (
    "two_transfers",
    "<answer>"
    + route(
      ("Line 1", "Alder", "Dover"), ("Line 3", "Dover", "Jade"), ("Line 4", "Jade", "Lark")
    ).rstrip("\n")
    + "</answer>",
    0,
    0,
    0,
  ),  # tag glued to the stop
]


@pytest.mark.parametrize("fix", [False, True], ids=["released", "corrected"])
@pytest.mark.parametrize("question, answer, correct, detail, fixed_detail", ROUTES)
def test_route_table(question, answer, correct, detail, fixed_detail, fix):
  station_1, station_2, transfers, difficulty, weight = QUESTIONS[question]
  result = rm.reasonmap_reward(
    answer,
    "planning",
    None,
    station_1,
    station_2,
    METRO,
    difficulty,
    transfers,
    fix_leg_count_off_by_one=fix,
  )
  expected_detail = fixed_detail if fix else detail
  assert result["accuracy"] == correct
  assert result["detail"] == expected_detail
  assert result["weight"] == pytest.approx(weight)
  assert result["overall"] == pytest.approx((10 * correct + 0.5 * expected_detail) * weight)


def test_route_table_is_large_enough():
  assert len(ROUTES) >= 20


def test_route_scores_spelled_out():
  minimal = route(("Line 1", "Alder", "Birch"), ("Line 2", "Birch", "Grove"))
  args = ("planning", None, "Alder Station", "Grove Station", METRO, "middle", 1)
  assert rm.reasonmap_reward(minimal, *args)["overall"] == pytest.approx(
    20.4
  )  # (10 + 0.5 * 4) * 1.7
  assert rm.reasonmap_reward(minimal, *args, fix_leg_count_off_by_one=True)[
    "overall"
  ] == pytest.approx(24.65)
  assert rm.reasonmap_reward(minimal, *args, difficulty_aware=False)["overall"] == pytest.approx(
    12.0
  )
  assert rm.reasonmap_reward("gibberish", *args, format_bonus=1.0)["overall"] == 0.0
  assert rm.reasonmap_reward(minimal, *args, format_bonus=1.0)["overall"] == pytest.approx(22.1)


# (type, completion, ground truth, correct)
VQA = [
  ("TorF1", "The answer is \\boxed{Yes}.", 1, True),
  ("TorF2", "\\boxed{no}", 0, True),
  ("TorF1", "\\boxed{no}", 1, False),
  ("TorF1", "Yes", 1, True),
  ("TorF1", "I think yes. The answer is: yes", 1, True),
  ("TorF2", "\\boxed{\\text{Yes}}", 1, False),  # \text is dropped but its braces stay
  ("Counting2", "so \\boxed{3}", 3, True),
  ("Counting3", "The final answer is 4", 4, True),
  ("Counting2", "\\boxed{2} first, then \\boxed{3}", 3, True),  # the last box
  ("Counting2", "There are 3 stops, so \\boxed{3 stops}", 3, False),
  ("Counting3", "\\boxed{3.0}", 3, False),
  ("Counting1", "\\boxed{B}", 1, True),
  ("Counting1", "The answer is C.", 2, True),
  ("Counting1", "\\boxed{E}", 4, False),
  ("Counting1", "\\boxed{B}", "1", True),  # ground truth stored as text
]


@pytest.mark.parametrize("question_type, completion, truth, correct", VQA)
def test_vqa_answers(question_type, completion, truth, correct):
  result = rm.reasonmap_reward(completion, question_type, truth, "", "", {}, "middle", None)
  assert result["accuracy"] == correct
  assert result["overall"] == pytest.approx(12.0 if correct else 0.0)  # 10 * 1.2, no detail


def test_difficulty_weights():
  assert rm.difficulty_weight("TorF1", None, "easy") == 1.0
  assert rm.difficulty_weight("Counting3", None, "hard") == 1.5
  assert rm.difficulty_weight("planning", 0, "middle") == 1.2
  assert rm.difficulty_weight("planning", 2, "hard") == 2.0
  assert rm.difficulty_weight("planning", 1, "unknown") is None
  assert (
    rm.reasonmap_reward("\\boxed{yes}", "TorF1", 1, "", "", {}, "unknown", None)["weight"] == 1.0
  )


def test_station_cleaners():
  assert rm.clean_station_name("Asian Games Village Station") == "yayuncun"
  assert rm.clean_station_name("Main Road (North)") == "mainlu"
  # The release's chained replaces turn "Univ." into "University", then its "Univ" again.
  assert rm.clean_station_name("Tech Univ.") == "technologyuniversityersity"
  assert rm.clean_station_name("天安门站") == "天安门"
  assert (
    rm.clean_station_name_eval("Lancy-Bachet-Gare Station (Transfer Station)")
    == "lancybachetgarestation"
  )
  assert rm.clean_station_name_eval("(a (b) c)") == "c)"  # the bracket regex stops at the first ")"


# ReasonMap benchmark scores.


def leg(line, departure, arrival, via):
  return {
    "route_name": line,
    "departure_stop": departure,
    "arrival_stop": arrival,
    "via_stops": via,
    "num_via_stops": len(via),
  }


PLAN = {
  "plan_0": [
    leg("Line 1", "Alder", "Dover", ["Birch", "Cedar"]),
    leg("Line 3", "Dover", "Jade", ["Iris", "Harbor"]),
    leg("Line 4", "Jade", "Lark", ["Kiln"]),
  ]
}
LEGS = [
  ("Line 1", "Alder Station", "Dover Station"),
  ("Line 3", "Dover Station", "Jade Station"),
  ("Line 4", "Jade Station", "Lark Station"),
]


def bench(answer, long=False, plans=None, question=""):
  """Benchmark scores for Alder -> Lark on the hand-made map, outside China."""
  return rm.planning_benchmark_scores(
    answer,
    long,
    "Alder Station",
    "Lark Station",
    METRO,
    plans or PLAN,
    "testland",
    "x",
    question=question,
  )


def test_benchmark_short():
  scores = bench(route(*LEGS))
  # 1 (endpoints) + 2 per leg (stops; outside China the line-name check never matches) + 10.
  assert scores["accuracy"] == 1.0 and scores["map_score"] == 17.0
  assert scores["route_name_score"] == 0.0
  with_suffix = {
    "p": [dict(x, departure_stop=x["departure_stop"] + " Station") for x in PLAN["plan_0"]]
  }
  assert bench(route(*LEGS), plans=with_suffix)["map_score"] == 14.0  # the release's arrival quirk
  scores = bench(route(("Line 1", "Alder", "Dover")))
  assert scores["accuracy"] == 0.0 and scores["map_score"] == 0.0
  # The eval cleaner keeps "Station", so bare names miss the stations.
  assert bench(route(*[(line, a[:-8], b[:-8]) for line, a, b in LEGS]))["accuracy"] == 0.0


def test_benchmark_long_number_of_via_stops():
  answer = "--\n".join(
    f"Route Name: {line}\nDeparture Stop: {a}\nArrival Stop: {b}\nNumber of Via Stops: {n}\n"
    for (line, a, b), n in zip(LEGS, (2, 2, 3))
  )
  scores = bench(answer, long=True, question="... Number of Via Stops: ...")
  assert scores["num_via_stops_score"] == 8.0  # 4 + 4 + max(0, 4 - 2 / 1 * 4)
  assert scores["map_score"] == 35.0  # 1 + 6 + 8, then + 20 for a correct route
  # A long answer's arrival must end its line.
  scores = bench(route(*LEGS).rstrip("\n"), long=True, question="Number of Via Stops:")
  assert scores["accuracy"] == 0.0


CHINA_METRO = rm.metro_lines(
  {"Line 1": ["甲站", "乙站", "丙站（换乘站）"], "Line 2": ["丙站（换乘站）", "丁站", "戊站"]}
)
CHINA_PLAN = {
  "方案1": [
    leg("地铁1号线(甲--丙)", "甲", "丙", ["乙"]),
    leg("地铁2号线(丙--戊)", "丙", "戊", ["丁"]),
  ]
}


def china(answer, long=False, question=""):
  return rm.planning_benchmark_scores(
    answer, long, "甲站", "戊站", CHINA_METRO, CHINA_PLAN, "china", "x", question=question
  )


def test_benchmark_china():
  scores = china(route(("Line 1", "甲站", "丙站"), ("Line 2", "丙站", "戊站")))
  assert scores["accuracy"] == 1.0 and scores["route_name_score"] == 4.0
  assert scores["map_score"] == 19.0
  long = (
    "Route Name: Line 1\nDeparture Stop: 甲站\nArrival Stop: 丙站\nVia Stops: 乙站\n--\n"
    "Route Name: Line 2\nDeparture Stop: 丙站\nArrival Stop: 戊站\nVia Stops: 丁站\n"
  )
  scores = china(long, long=True, question="... Via Stops: ...")
  assert scores["via_stops_score"] == 6.0  # (IoU 1 * 10 + 2 matched) / 2
  assert scores["map_score"] == 35.0  # 1 + 8 + 6, then + 20


def test_benchmark_best_plan_wins():
  plans = {"a": [leg("Line 1", "Nowhere", "Nowhere", [])], "b": PLAN["plan_0"]}
  assert bench(route(*LEGS), plans=plans)["map_score"] == 17.0


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="(（)）ab ", max_size=30))
def test_bracket_removal_equals_the_release_regex(text):
  assert rm._drop_bracketed(text) == re.sub(r"[\(\（][^\)\）]*[\)\）]", "", text)


COMPLETIONS = st.one_of(
  st.text(max_size=300),
  st.lists(
    st.sampled_from(
      [
        "Route Name: ",
        "Departure Stop: ",
        "Arrival Stop: ",
        "--",
        "\n",
        "Line 1",
        "Alder",
        "Birch",
        "\\boxed{",
        "}",
        "yes",
        "oxed{",
        "(",
        "（",
        "Via Stops: ",
        "站",
        "3",
      ]
    ),
    max_size=60,
  ).map("".join),
  st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(["--", "(", "oxed{", "Route Name: \n"]),
    st.integers(0, 4000),
  ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  COMPLETIONS,
  st.sampled_from(rm.QUESTION_TYPES + ("Counting9", "")),
  st.sampled_from([None, 0, 1, 3, "2", "x"]),
)
def test_reward_never_raises(completion, question_type, truth):
  result = rm.reasonmap_reward(
    completion, question_type, truth, "Alder Station", "Lark Station", METRO, "hard", 2
  )
  assert set(result) == {"overall", "accuracy", "detail", "weight", "format"}
  assert all(isinstance(v, float) for v in result.values())
  for long_question in (False, True):
    rm.planning_benchmark_scores(
      completion,
      long_question,
      "Alder Station",
      "Lark Station",
      METRO,
      PLAN,
      "china",
      "x",
      question="Number of Via Stops:" if long_question else "",
    )
  json.dumps(result)
