"""The OSQ judge client against a scripted OpenAI-style server on 127.0.0.1 (helpers.JudgeServer)."""

import base64
import email.utils
import io
import time
import types
import urllib.request

import pytest
from helpers import JudgeServer
from PIL import Image

from metaphorstar_jax import judge as judge_lib
from metaphorstar_jax.tasks import io as task_io


@pytest.fixture
def server():
  with JudgeServer() as running:
    yield running


def make_judge(server, **changes):
  values = dict(base_url=server.url, model="test-judge", api_key="secret", repeats=1,
                concurrency=1, timeout_s=5.0, max_retries=2, backoff_s=0.01, max_backoff_s=0.05)
  values.update(changes)
  return judge_lib.Judge(judge_lib.JudgeConfig(**values))


IMAGE = task_io.png_bytes(Image.new("RGB", (8, 8), (200, 30, 30)))
ITEM = judge_lib.JudgeItem(question="What is the implication in this image?",
                           reference="Greed consumes the greedy.",
                           answer="<think>a red square</think><answer>Greed backfires.</answer>",
                           images=(IMAGE,))


def test_success_sends_rubric_image_and_settings(server):
  judge = make_judge(server, repeats=3)
  verdict = judge.judge(ITEM)
  assert verdict.score == 4.0 and verdict.grades == (4, 4, 4) and verdict.malformed == 0
  assert len(server.requests) == 3
  headers, body = server.requests[0]
  assert headers["Authorization"] == "Bearer secret"
  assert body["model"] == "test-judge"
  assert body["temperature"] == 0.0 and body["top_p"] == 0.9
  text, image = body["messages"][0]["content"]
  assert "Greed consumes the greedy." in text["text"]
  assert "Greed backfires." in text["text"] and "a red square" not in text["text"]
  assert text["text"].rstrip().endswith("for example [3 points].")
  prefix = "data:image/png;base64,"
  assert image["type"] == "image_url" and image["image_url"]["detail"] == "high"
  assert image["image_url"]["url"].startswith(prefix)
  assert base64.b64decode(image["image_url"]["url"][len(prefix):]) == IMAGE
  assert judge.stats == {"requests": 3, "failed": 0, "retries": 0, "cache_hits": 0,
                         "malformed": 0}


def test_retries_after_server_error(server):
  server.then(("status", 500), ("status", 503), ("reply", "[2 points]"))
  judge = make_judge(server)
  assert judge.judge(ITEM).score == 2.0
  assert len(server.requests) == 3
  assert judge.stats["retries"] == 2


def test_clear_error_after_last_retry(server):
  server.then(*[("status", 500)] * 3)
  judge = make_judge(server, max_retries=2)
  with pytest.raises(judge_lib.JudgeError, match=r"failed 3 time\(s\).*HTTP 500"):
    judge.judge(ITEM)
  assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
  server.then(("status", 401))
  with pytest.raises(judge_lib.JudgeError, match="HTTP 401.*API key"):
    make_judge(server).judge(ITEM)
  assert len(server.requests) == 1


def test_connection_refused_is_retried_then_reported():
  with JudgeServer() as gone:
    url = gone.url
  judge = judge_lib.Judge(judge_lib.JudgeConfig(base_url=url, model="m", repeats=1,
                                                max_retries=1, backoff_s=0.01, timeout_s=1.0))
  with pytest.raises(judge_lib.JudgeError, match="failed 2 time"):
    judge.judge(ITEM)
  assert judge.stats["requests"] == 2


def test_malformed_replies_are_counted_and_missing(server):
  server.then(("reply", "I would rather not grade this."), ("reply", "Fine work."),
              ("reply", "[9 points]"), ("reply", "[5 points]"))
  judge = make_judge(server, repeats=2)
  other = judge_lib.JudgeItem(ITEM.question, ITEM.reference, "Another reading.", ITEM.images)
  first, second = judge.judge_many([ITEM, other])
  assert first.score is None and first.grades == (None, None) and first.malformed == 2
  assert second.score == 5.0 and second.grades == (None, 5)
  metrics = judge_lib.verdict_metrics([first, second])
  assert metrics["judge/score"] == 5.0
  assert metrics["judge/score_missing_as_zero"] == 2.5
  assert metrics["judge/missing"] == 1 and metrics["judge/malformed_replies"] == 3
  assert judge.stats["malformed"] == 3


def test_cache_resumes_an_interrupted_run(server, tmp_path):
  cache = str(tmp_path / "judge_cache.jsonl")
  items = [judge_lib.JudgeItem("q", "ref", f"answer {i}", (IMAGE,)) for i in range(3)]
  server.then(("reply", "[1 points]"), ("reply", "[2 points]"), ("reply", "[3 points]"),
              ("status", 500))
  interrupted = make_judge(server, repeats=2, max_retries=0, cache_path=cache)
  with pytest.raises(judge_lib.JudgeError):
    interrupted.judge_many(items)
  assert len(server.requests) == 4
  with open(cache) as handle:
    text = handle.read()
  assert len(text.splitlines()) == 3 and "secret" not in text

  resumed = make_judge(server, repeats=2, cache_path=cache)
  verdicts = resumed.judge_many(items)
  assert len(server.requests) == 4 + 3  # only the three unanswered judgements are asked
  assert resumed.stats["cache_hits"] == 3
  assert [v.grades for v in verdicts] == [(1, 2), (3, 4), (4, 4)]

  again = make_judge(server, repeats=2, cache_path=cache)
  assert again.judge_many(items) == verdicts
  assert len(server.requests) == 7 and again.stats["requests"] == 0


def test_cache_survives_a_torn_last_line(server, tmp_path):
  cache = tmp_path / "cache.jsonl"
  make_judge(server, cache_path=str(cache)).judge(ITEM)
  with open(cache, "a") as handle:
    handle.write('{"key": "abc", "rep')  # a run killed mid-write
  assert make_judge(server, cache_path=str(cache)).judge(ITEM).score == 4.0
  assert len(server.requests) == 1


def test_a_200_that_is_not_a_chat_completion_is_retried_and_never_cached(server, tmp_path):
  # Issue 12, defect 5: such a reply was cached as "" and scored missing for good.
  cache = tmp_path / "cache.jsonl"
  server.then(("garbage", None), ("status", (200, b'{"error": "upstream busy"}')),
              ("reply", "[2 points]"))
  judge = make_judge(server, cache_path=str(cache))
  assert judge.judge(ITEM).score == 2.0
  assert judge.stats["failed"] == 2 and judge.stats["retries"] == 2
  assert len(cache.read_text().splitlines()) == 1 and '"[2 points]"' in cache.read_text()
  server.then(*[("garbage", None)] * 3)
  with pytest.raises(judge_lib.JudgeError, match="failed 3 time.*not a chat completion"):
    make_judge(server, cache_path=str(cache)).judge(judge_lib.JudgeItem("q", "r", "other"))
  assert len(cache.read_text().splitlines()) == 1


@pytest.mark.parametrize("action", ["reply", "unsized"])
def test_an_oversized_reply_is_a_failed_request_never_cached(server, tmp_path, action):
  cache = tmp_path / "cache.jsonl"
  server.then((action, "[5 points] " + "padding " * 1000))  # about 8 KiB
  judge = make_judge(server, max_reply_bytes=4096, cache_path=str(cache))
  assert judge.judge(ITEM).score == 4.0  # the retry's default reply
  assert judge.stats["failed"] == 1 and "padding" not in cache.read_text()
  server.then(*[(action, "[5 points] " + "padding " * 1000)] * 3)
  with pytest.raises(judge_lib.JudgeError, match="max_reply_bytes=4096"):
    make_judge(server, max_reply_bytes=4096).judge(judge_lib.JudgeItem("q", "r", "other"))


def test_a_trickling_server_is_cut_off_at_the_deadline(server):
  # One byte every 50 ms never times a 1 s read out; the whole reply would take about 8 s.
  server.then(("trickle", 0.05), ("trickle", 0.05))
  judge = make_judge(server, timeout_s=1.0, deadline_s=0.5, max_retries=0)
  started = time.monotonic()
  with pytest.raises(judge_lib.JudgeError, match=r"deadline_s=0.5"):
    judge.judge(ITEM)
  assert time.monotonic() - started < 3 * 0.5
  retried = make_judge(server, timeout_s=1.0, deadline_s=0.5, max_retries=1)
  assert retried.judge(ITEM).score == 4.0  # the second request is answered at once
  assert retried.stats["failed"] == 1


def test_retry_after_as_an_http_date_is_honoured(server, monkeypatch):
  waits = []
  monkeypatch.setattr(judge_lib, "time", types.SimpleNamespace(time=time.time, sleep=waits.append))
  later = email.utils.formatdate(time.time() + 30, usegmt=True)
  server.then(("status", (503, b"busy", {"Retry-After": later})), ("reply", "[3 points]"))
  assert make_judge(server, max_backoff_s=60.0).judge(ITEM).score == 3.0
  assert len(waits) == 1 and 28 <= waits[0] <= 30  # the date has whole seconds
  now = 1_700_000_000.0
  assert judge_lib.retry_after_seconds("Tue, 14 Nov 2023 22:13:30 GMT", now) == 10.0
  assert judge_lib.retry_after_seconds("Tue, 14 Nov 2023 22:13:10 GMT", now) == 0.0  # past
  assert judge_lib.retry_after_seconds("7", now) == 7.0
  assert judge_lib.retry_after_seconds("soon", now) is None
  assert judge_lib.retry_after_seconds(None, now) is None


def test_cache_survives_a_tail_torn_inside_a_character(server, tmp_path, caplog):
  cache = tmp_path / "cache.jsonl"
  server.then(("reply", "[4 points] très juste"))
  make_judge(server, cache_path=str(cache)).judge(ITEM)
  whole = cache.read_bytes()
  cache.write_bytes(whole + whole[:whole.index("è".encode()) + 1])  # a kill mid-character
  caplog.set_level("WARNING")
  restarted = make_judge(server, cache_path=str(cache))
  assert "partial line" in caplog.text and cache.read_bytes() == whole  # cut off
  assert restarted.judge(ITEM).score == 4.0 and restarted.stats["cache_hits"] == 1
  other = judge_lib.JudgeItem("q", "r", "another answer")
  restarted.judge(other)  # appended on a line of its own
  again = make_judge(server, cache_path=str(cache))
  again.judge_many([ITEM, other])
  assert again.stats["requests"] == 0 and len(server.requests) == 2


def test_timeout_is_retried_and_reported(server):
  server.then(("sleep", 0.6))
  judge = make_judge(server, timeout_s=0.15, max_retries=1)
  assert judge.judge(ITEM).score == 4.0
  assert judge.stats["retries"] == 1
  server.then(("sleep", 0.6))
  with pytest.raises(judge_lib.JudgeError, match="(?i)timed out"):
    make_judge(server, timeout_s=0.15, max_retries=0).judge(ITEM)


def test_parse_grade():
  assert judge_lib.parse_grade("[4 points]") == 4
  assert judge_lib.parse_grade("Weighing all 5 criteria: [2 points]") == 2
  assert judge_lib.parse_grade("Score: 3") == 3  # MetaphorStar's first-integer rule
  assert judge_lib.parse_grade("[1 point]") == 1
  assert judge_lib.parse_grade("[7 points]") is None
  assert judge_lib.parse_grade("0") is None
  assert judge_lib.parse_grade("no grade") is None
  assert judge_lib.parse_grade(None) is None


def test_cache_key_depends_on_every_part():
  base = ("m", "prompt", "answer", [b"image"], 0)
  key = judge_lib.cache_key(*base)
  for index, changed in enumerate(("m2", "prompt2", "answer2", [b"image2"], 1)):
    other = list(base)
    other[index] = changed
    assert judge_lib.cache_key(*other) != key
  assert judge_lib.cache_key("m", "ab", "c", [], 0) != judge_lib.cache_key("m", "a", "bc", [], 0)


def test_config_from_values_then_environment():
  environ = {judge_lib.ENV_URL: "http://env/v1", judge_lib.ENV_MODEL: "env-model",
             judge_lib.ENV_API_KEY: "env-key"}
  from_env = judge_lib.JudgeConfig.resolve({"repeats": 5}, environ)
  assert (from_env.base_url, from_env.model, from_env.api_key, from_env.repeats) == (
      "http://env/v1", "env-model", "env-key", 5)
  assert "env-key" not in repr(from_env)
  explicit = judge_lib.JudgeConfig.resolve({"model": "gpt-4o-2024-11-20"}, environ)
  assert explicit.model == "gpt-4o-2024-11-20" and explicit.base_url == "http://env/v1"
  with pytest.raises(ValueError, match="repeat"):
    judge_lib.JudgeConfig.resolve({"repeat": 3}, {})
  with pytest.raises(judge_lib.JudgeError, match=judge_lib.ENV_URL):
    judge_lib.Judge(judge_lib.JudgeConfig.resolve({}, {}))


# --- where the key may go -----------------------------------------------------------------------

@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_refused_and_the_key_stays_home(server, code):
  with JudgeServer() as elsewhere:
    server.then(("redirect", (code, elsewhere.url + "/chat/completions")))
    with pytest.raises(judge_lib.JudgeError) as raised:
      make_judge(server).judge(ITEM)
    assert elsewhere.requests == []  # neither the key nor anything else reached the other port
  message = str(raised.value)
  assert server.origin in message and elsewhere.origin in message and f"HTTP {code}" in message
  assert len(server.requests) == 1  # refused at once, not retried


def test_a_redirect_within_the_host_is_followed(server):
  # 307 repeats the POST, body and key included; 302 turns it into a GET, as HTTP says.
  server.then(("redirect", (307, "/moved/v1/chat/completions")), ("reply", "[2 points]"),
              ("redirect", (302, server.url + "/chat/completions")), ("reply", "[5 points]"))
  judge = make_judge(server)
  assert judge.judge(ITEM).score == 2.0
  assert server.paths[:2] == [("POST", "/v1/chat/completions"),
                              ("POST", "/moved/v1/chat/completions")]
  assert server.requests[1][1] == server.requests[0][1]
  assert judge.judge(judge_lib.JudgeItem("q", "r", "another answer")).score == 5.0
  assert server.paths[3] == ("GET", "/v1/chat/completions")
  assert all(headers["Authorization"] == "Bearer secret" for headers, _ in server.requests)


def test_plain_http_to_another_machine_warns_that_the_key_travels_unencrypted(caplog):
  caplog.set_level("WARNING")
  for url in ("https://judge.example/v1", "http://127.0.0.1:9/v1", "http://localhost:9/v1",
              "http://[::1]:9/v1"):
    judge_lib.Judge(judge_lib.JudgeConfig(base_url=url, model="m", api_key="k3y-value"))
  judge_lib.Judge(judge_lib.JudgeConfig(base_url="http://judge.example/v1", model="m"))  # no key
  assert "unencrypted" not in caplog.text
  judge_lib.Judge(judge_lib.JudgeConfig(base_url="http://judge.example/v1", model="m",
                                        api_key="k3y-value"))
  assert "http://judge.example" in caplog.text and "unencrypted" in caplog.text
  assert "k3y-value" not in caplog.text


def test_a_key_the_server_echoes_stays_out_of_errors_replies_and_the_cache(server, tmp_path,
                                                                           caplog):
  caplog.set_level("WARNING")
  key = "sk-echoed-0123456789"
  server.then(("reply", f"[3 points] (your key {key})"))
  cache = tmp_path / "cache.jsonl"
  verdict = make_judge(server, api_key=key, cache_path=str(cache)).judge(ITEM)
  assert verdict.score == 3.0 and key not in verdict.replies[0]
  assert key not in cache.read_text()

  server.then(("status", (400, f'{{"error": "invalid key {key}"}}'.encode())))
  with pytest.raises(judge_lib.JudgeError, match="HTTP 400.*invalid key <redacted>") as raised:
    make_judge(server, api_key=key).judge(judge_lib.JudgeItem("q", "r", "new answer"))
  assert key not in str(raised.value) and raised.value.__cause__ is None  # nor in urllib's error
  server.then(*[("status", (503, f"overloaded, {key}".encode()))] * 2)
  with pytest.raises(judge_lib.JudgeError, match="failed 2 time.*overloaded") as raised:
    make_judge(server, api_key=key, max_retries=1).judge(judge_lib.JudgeItem("q", "r", "third"))
  assert key not in str(raised.value)
  assert "Judge request failed" in caplog.text and key not in caplog.text  # the retry's warning


def test_a_missing_key_says_where_to_put_it(server):
  server.then(("status", 401))
  with pytest.raises(judge_lib.JudgeError, match=f"No API key was sent.*{judge_lib.ENV_API_KEY}"
                                                  ".*--config.judge.api_key"):
    make_judge(server, api_key="").judge(ITEM)


def test_a_key_redacted_on_disk_comes_from_the_environment_again():
  read_back = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": "<redacted>"}
  config = judge_lib.JudgeConfig.resolve(read_back, {judge_lib.ENV_API_KEY: "from-env"})
  assert config.api_key == "from-env"
  with pytest.raises(judge_lib.JudgeError, match=f"never written.*{judge_lib.ENV_API_KEY}.*"
                                                  "--config.judge.api_key"):
    judge_lib.JudgeConfig.resolve(read_back, {})


def test_redirect_rules_for_schemes_and_ports():
  def follow(configured, target, code=302):
    handler = judge_lib.SameHostRedirects(configured)
    request = urllib.request.Request(configured, data=b"{}", method="POST",
                                     headers={"Authorization": "Bearer k"})
    return handler.redirect_request(request, io.BytesIO(), code, "moved", {}, target)

  upgraded = follow("http://judge.example/v1/chat/completions",
                    "https://judge.example/v1/chat/completions", code=308)
  assert upgraded.full_url.startswith("https://") and upgraded.get_method() == "POST"
  assert upgraded.get_header("Authorization") == "Bearer k" and upgraded.data == b"{}"
  for configured, target in (("https://judge.example/v1", "http://judge.example/v1"),
                             ("http://judge.example/v1", "https://judge.example:8443/v1"),
                             ("https://judge.example/v1", "https://judge.example.evil/v1")):
    with pytest.raises(judge_lib.JudgeError, match=f"redirect to {target[:-3]}.*Refusing"):
      follow(configured, target)
