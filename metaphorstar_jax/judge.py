"""An LLM judge behind any OpenAI-compatible chat endpoint, for open-ended answers (spec §1.8).

MetaphorStar's OSQ benchmark has no rule-based answer: a vision LLM (GPT-4o in the paper) reads
the image, the human reference interpretation and the model's interpretation, and grades the
latter from 1 to 5; each answer is judged several times and the grades averaged.

    judge = Judge(JudgeConfig.resolve(config.judge.to_dict()))  # URL/model/key: config, then env
    verdicts = judge.judge_many([JudgeItem(question, reference, answer, images), ...])
    verdicts[0].score      # mean of the parsable grades, None if no repeat gave one

Endpoint: `POST {base_url}/chat/completions` with the image as a base64 data URL in the OpenAI
vision message format, so OpenAI, Azure-style proxies, vLLM and SGLang servers all work. When the
config leaves them empty, URL, model and key come from METAPHORSTAR_JUDGE_URL, _MODEL and
_API_KEY. The key is sent as a bearer token, only to the configured host, and never written to
the cache, the logs or an error message (metaphorstar_jax/redaction.py scrubs it).

Where the key may go: a redirect to another host (or from https to http) is refused with a
JudgeError naming both, because urllib's own handler would copy the Authorization header to
wherever the reply points. Redirects within the host are followed: 307 and 308 repeat the POST,
301, 302 and 303 turn into a GET as HTTP says. Plain http:// to a host other than this machine
logs a warning that the key travels unencrypted.

Why only the standard library (urllib): a judge call is one JSON POST. The `openai` client would
pull httpx, pydantic and their pins into every install (TPU images included) for that one call,
and its own retry policy would hide the retries we count. urllib gives us explicit timeouts,
retries and error messages in a few lines.

Robustness:
* Server errors (HTTP 5xx, 429), connection errors and timeouts are retried with exponential
  backoff, waiting as long as a `Retry-After` asks (seconds or an HTTP date; up to
  `max_backoff_s`); after the last retry a JudgeError says what failed and where.
* Each request has a wall-clock deadline (`deadline_s`) besides the per-read `timeout_s`: a
  server that trickles its reply a byte at a time never times a read out, so a watchdog closes
  the socket when the deadline passes.
* A reply larger than `max_reply_bytes`, or a 200 whose body is not a chat completion (not JSON,
  no `choices[0].message.content`), is a failed request: retried like a server error, never
  cached.
* Other HTTP errors (401 bad key, 404 wrong URL or model) fail at once: retrying cannot help.
* A reply without a parsable 1-5 grade is counted as malformed and scored as missing; it never
  stops an evaluation.
* Every reply is appended to a JSONL cache keyed by a hash of (model, prompt, answer, image bytes,
  repeat index), so an interrupted evaluation resumes without asking again. A line a kill tore
  (even inside a multi-byte character) is cut off at the next start, with a warning.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import email.utils
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from metaphorstar_jax import redaction
from metaphorstar_jax.rewards.tags import as_text, last_tag_content
from metaphorstar_jax.tasks import io as task_io

ENV_URL = "METAPHORSTAR_JUDGE_URL"
ENV_MODEL = "METAPHORSTAR_JUDGE_MODEL"
ENV_API_KEY = "METAPHORSTAR_JUDGE_API_KEY"
AUTH_STATUS = (401, 403)  # the key is missing or wrong
RETRYABLE_STATUS = (408, 429)  # besides every 5xx: timeouts and rate limits pass with time

# Our own rubric. It grades what MetaphorStar's OSQ judge grades (spec §1.8): the visible content,
# the emotion, the domain and context, the rhetorical devices and, above all, the implication.
RUBRIC = """You are grading an interpretation of an image. The image is attached. A person wrote \
the reference interpretation; a model wrote the candidate. Judge the candidate against the image \
and the reference.

What to weigh, most important first:
1. Implication: does the candidate grasp the message, metaphor or point the image makes?
2. Rhetorical devices: does it see how the image makes that point (symbol, contrast, irony, \
exaggeration, juxtaposition, wordplay)?
3. Domain and context: does it place the image in the right setting (society, daily life, \
psychology, art, environment, ...)?
4. Emotion: does it name the attitude or feeling the image conveys?
5. Surface: does it read the visible elements and any text in the image correctly?

Grades:
1 - misreads the image or its message; at most a shallow description.
2 - a fair description, but the implication is missing or mostly wrong.
3 - part of the implication is right; clear gaps or errors remain.
4 - the main implication and most of its nuances are right; small omissions only.
5 - agrees with the reference in substance, deeper meaning included.

Judge the substance only: neither length nor style earns or loses points.

Question asked: {question}

Reference interpretation: {reference}

Candidate interpretation: {answer}

Reply with the grade alone, in the form [N points], for example [3 points]."""

_BRACKETED = re.compile(r"\[\s*(\d+)\s*points?\s*\]", re.IGNORECASE)
_FIRST_INTEGER = re.compile(r"\d+")


class JudgeError(RuntimeError):
  """The judge could not be reached or refused the request; the message says what to check."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """Where the judge is and how it is asked.

  Attributes:
    base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"; "/chat/completions"
      is appended.
    model: the judge model name, e.g. "gpt-4o-2024-11-20" (MetaphorStar's, spec §1.8).
    api_key: bearer token; empty sends none (local servers).
    repeats: judgements per answer, averaged (spec §1.8: at least 3).
    temperature, top_p: the judge's sampling (spec §1.8: 0 and 0.9).
    max_tokens: reply budget; the grade needs a few tokens.
    image_detail: OpenAI vision detail level (spec §1.8: "high").
    min_score, max_score: the grade range; a grade outside it counts as malformed.
    timeout_s: seconds any one socket operation (connect, one read) may wait.
    deadline_s: wall-clock seconds one HTTP request may take in all, however the server trickles.
    max_reply_bytes: the largest reply body read; a grade takes a few hundred bytes, and a larger
      body is a failed request (retried), never cached or scored.
    max_retries: retries after a failed request (server error, connection error, timeout).
    backoff_s, max_backoff_s: the first retry waits about backoff_s, doubling up to max_backoff_s.
    concurrency: requests in flight at once.
    cache_path: JSONL cache of replies; empty: no cache.
    answer_only: send only the candidate's last <answer>...</answer> when it has one.
  """

  base_url: str = ""
  model: str = ""
  api_key: str = dataclasses.field(default="", repr=False)
  repeats: int = 3
  temperature: float = 0.0
  top_p: float = 0.9
  max_tokens: int = 32
  image_detail: str = "high"
  min_score: int = 1
  max_score: int = 5
  timeout_s: float = 60.0
  deadline_s: float = 120.0
  max_reply_bytes: int = 1 << 20  # 1 MiB: thousands of times a chat-completion body with a grade
  max_retries: int = 4
  backoff_s: float = 1.0
  max_backoff_s: float = 30.0
  concurrency: int = 4
  cache_path: str = ""
  answer_only: bool = True

  def __post_init__(self):
    if self.repeats < 1 or self.concurrency < 1 or self.max_retries < 0:
      raise ValueError(f"JudgeConfig needs repeats >= 1, concurrency >= 1 and max_retries >= 0; "
                       f"got {self.repeats}, {self.concurrency} and {self.max_retries}.")
    if self.timeout_s <= 0 or self.min_score > self.max_score:
      raise ValueError(f"JudgeConfig needs timeout_s > 0 and min_score <= max_score; got "
                       f"{self.timeout_s}, {self.min_score} and {self.max_score}.")
    if self.deadline_s <= 0 or self.max_reply_bytes < 1:
      raise ValueError(f"JudgeConfig needs deadline_s > 0 and max_reply_bytes >= 1; got "
                       f"{self.deadline_s} and {self.max_reply_bytes}.")

  @property
  def configured(self) -> bool:
    return bool(self.base_url and self.model)

  @classmethod
  def resolve(cls, values: Mapping[str, Any] | None = None,
              environ: Mapping[str, str] | None = None) -> JudgeConfig:
    """Fields from `values` (e.g. `config.judge`), with URL, model and key taken from the
    environment where `values` leaves them empty. Unknown field names raise."""
    values = dict(values or {})
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"Unknown judge setting(s) {unknown}; known ones are {sorted(names)}.")
    environ = os.environ if environ is None else environ
    # A config read back from a run folder holds REDACTED where the key was: keys never go to
    # disk, so it must come from the environment (or the flag) again.
    redacted = values.get("api_key") == redaction.REDACTED
    if redacted:
      values["api_key"] = ""
    for name, variable in (("base_url", ENV_URL), ("model", ENV_MODEL), ("api_key", ENV_API_KEY)):
      if not values.get(name):
        values[name] = environ.get(variable, "")
    if redacted and not values["api_key"]:
      raise JudgeError(f"judge.api_key reads {redaction.REDACTED!r}: this config was read back "
                       "from a run, and keys are never written there. Give the key again: set "
                       f"the environment variable {ENV_API_KEY} (preferred), or pass "
                       "--config.judge.api_key.")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class JudgeItem:
  """One answer to grade: the question, the reference answer, the candidate and its images
  (encoded bytes or PIL images)."""

  question: str
  reference: str
  answer: str
  images: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The judge's grades of one answer.

  Attributes:
    score: mean of the parsable grades; None when no repeat gave one (scored as missing).
    grades: one per repeat; None where the reply had no grade in range.
    replies: the raw replies, one per repeat.
  """

  score: float | None
  grades: tuple[int | None, ...]
  replies: tuple[str, ...]

  @property
  def malformed(self) -> int:
    return sum(grade is None for grade in self.grades)


def parse_grade(reply: Any, min_score: int = 1, max_score: int = 5) -> int | None:
  """The grade in a judge reply, or None.

  "[N points]" wins when present; otherwise the first integer, the rule MetaphorStar's scorer
  applies (spec §1.8). A grade outside [min_score, max_score] is None.
  """
  text = as_text(reply)
  match = _BRACKETED.search(text) or _FIRST_INTEGER.search(text)
  if match is None:
    return None
  grade = int(match.group(1) if match.re is _BRACKETED else match.group())
  return grade if min_score <= grade <= max_score else None


def candidate_text(completion: Any, answer_only: bool = True) -> str:
  """What the judge reads of a completion: its last <answer> span if asked and present, else all."""
  text = as_text(completion)
  if answer_only:
    inside = last_tag_content(text, "answer")
    if inside is not None and inside.strip():
      return inside.strip()
  return text.strip()


def _image_bytes(image: Any) -> bytes:
  if isinstance(image, (bytes, bytearray, memoryview)):
    return bytes(image)
  return task_io.png_bytes(task_io.to_pil(image))


def _mime_type(data: bytes) -> str:
  if data.startswith(b"\xff\xd8"):
    return "image/jpeg"
  if data.startswith(b"GIF8"):
    return "image/gif"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "image/webp"
  return "image/png"


def build_messages(prompt: str, images: Sequence[bytes], detail: str) -> list[dict[str, Any]]:
  """One user message: the rubric text, then each image as a base64 data URL."""
  content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
  for data in images:
    url = f"data:{_mime_type(data)};base64,{base64.b64encode(data).decode('ascii')}"
    content.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
  return [{"role": "user", "content": content}]


def cache_key(model: str, prompt: str, answer: str, images: Sequence[bytes], repeat: int) -> str:
  """sha256 over the judge model, the prompt, the answer, every image's bytes and the repeat."""
  digest = hashlib.sha256()
  for part in (model, prompt, answer):
    encoded = part.encode("utf-8")
    digest.update(len(encoded).to_bytes(8, "little") + encoded)
  for data in images:
    digest.update(len(data).to_bytes(8, "little") + hashlib.sha256(data).digest())
  digest.update(repeat.to_bytes(4, "little"))
  return digest.hexdigest()


def _reply_content(body: Any) -> str | None:
  """choices[0].message.content of a chat-completions body (string or list of text parts)."""
  try:
    content = body["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    return None
  if isinstance(content, list):
    content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
  return content if isinstance(content, str) else None


def _origin(url: str) -> tuple[str, str, int | None]:
  """(scheme, host, port) of `url`, the port filled in from the scheme when the URL has none."""
  parts = urllib.parse.urlsplit(url)
  scheme = parts.scheme.lower()
  port = parts.port or {"http": 80, "https": 443}.get(scheme)
  return scheme, (parts.hostname or "").lower(), port


def _netloc(url: str) -> str:
  """scheme://host[:port] of `url`, without any user:password@."""
  parts = urllib.parse.urlsplit(url)
  return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def is_loopback(host: str) -> bool:
  """Whether `host` names this machine (localhost, 127.0.0.0/8, ::1)."""
  if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
      ".localhost"):
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


class SameHostRedirects(urllib.request.HTTPRedirectHandler):
  """Follows redirects only within the configured host, so the Authorization header never
  reaches another one.

  Another host, another port, or https to http raises JudgeError naming both; http to https on
  the same host (its default port) is followed. Within the host,
  307 and 308 repeat the request with its body and headers (urllib's own handler refuses them for
  a POST); 301, 302 and 303 are urllib's: a GET without the body.
  """

  def __init__(self, configured_url: str):
    super().__init__()
    self.configured_url = configured_url

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    target = urllib.parse.urljoin(req.full_url, newurl)
    here, there = _origin(self.configured_url), _origin(target)
    upgrade = here[0] == "http" and there == ("https", here[1], 443)  # same host, encrypted
    if there != here and not upgrade:
      fp.close()
      raise JudgeError(f"The judge at {_netloc(self.configured_url)} answered HTTP {code}, a "
                       f"redirect to {_netloc(target)}: another host, port or scheme. Refusing "
                       "to follow it, because the API key would go with it (or travel "
                       "unencrypted). Set judge.base_url to the endpoint you mean to use.")
    if code in (307, 308) and req.get_method() == "POST":
      fp.close()
      return urllib.request.Request(target, data=req.data, headers=dict(req.headers),
                                    origin_req_host=req.origin_req_host, unverifiable=True,
                                    method="POST")
    return super().redirect_request(req, fp, code, msg, headers, target)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
  """The wait a `Retry-After` header asks for: delta-seconds or an HTTP date (RFC 9110 §10.2.3),
  as seconds from `now` (default: the clock), never negative; None when it is neither."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value.strip())
  except (TypeError, ValueError):
    return None
  if when.tzinfo is None:  # "-0000": HTTP dates are GMT
    when = when.replace(tzinfo=datetime.timezone.utc)
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _RequestFailed(Exception):
  """One request failed in a way a retry may mend; `retry_after` is the server's header."""

  def __init__(self, message: str, retry_after: str | None = None):
    super().__init__(message)
    self.retry_after = retry_after


_CURRENT = threading.local()  # .deadline: the _Deadline of the request this thread is sending


class _Deadline:
  """A wall-clock limit on one request. `timeout_s` bounds each socket operation only, so a server
  that trickles a byte at a time holds a request for ever; when this deadline passes, a timer
  shuts the request's sockets down, which ends the read that is waiting."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.expired = False
    self._sockets: list[socket.socket] = []
    self._lock = threading.Lock()
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True

  def __enter__(self) -> _Deadline:
    _CURRENT.deadline = self
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()
    _CURRENT.deadline = None

  @property
  def message(self) -> str:
    return f"no complete reply within judge.deadline_s={self.seconds} s"

  def watch(self, sock: socket.socket) -> None:
    with self._lock:
      self._sockets.append(sock)
      if self.expired:
        self._shut(sock)

  def _expire(self) -> None:
    with self._lock:
      self.expired = True
      for sock in self._sockets:
        self._shut(sock)

  @staticmethod
  def _shut(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown: SSLSocket's own would unwrap TLS under a reading thread
      socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
      pass  # already closed


def _watch(sock: socket.socket) -> None:
  deadline = getattr(_CURRENT, "deadline", None)
  if deadline is not None:
    deadline.watch(sock)


class _WatchedHTTPConnection(http.client.HTTPConnection):
  def connect(self):
    super().connect()
    _watch(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
  def connect(self):
    super().connect()  # the TLS handshake is bounded by timeout_s per message
    _watch(self.sock)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
  def http_open(self, req):
    return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
  def https_open(self, req):
    return self.do_open(_WatchedHTTPSConnection, req, context=self._context)


class Judge:
  """Grades answers through the configured endpoint, with retries and an on-disk cache.

  `stats` counts, since construction: requests sent (retries included), requests that failed,
  retries, replies read from the cache, and malformed replies (a reply without a grade).
  """

  def __init__(self, config: JudgeConfig):
    if not config.configured:
      raise JudgeError(f"No judge configured: set judge.base_url and judge.model in the config, or "
                       f"the environment variables {ENV_URL} and {ENV_MODEL} (and {ENV_API_KEY} "
                       "if the endpoint needs a key).")
    self.config = config
    self.url = config.base_url.rstrip("/") + "/chat/completions"
    self._opener = urllib.request.build_opener(SameHostRedirects(self.url), _WatchedHTTPHandler,
                                               _WatchedHTTPSHandler)
    self._secrets = redaction.secret_values() + [config.api_key]
    scheme, host, _ = _origin(self.url)
    if config.api_key and scheme == "http" and not is_loopback(host):
      logging.warning("The judge at %s is plain http:// on another machine: the API key travels "
                      "unencrypted. Use https:// unless the network is yours.",
                      self._safe(_netloc(self.url)))
    self.stats = {"requests": 0, "failed": 0, "retries": 0, "cache_hits": 0, "malformed": 0}
    self._lock = threading.Lock()
    self._abort = threading.Event()  # set by the first failed job; the queued ones then stop
    self._cache: dict[str, dict[str, Any]] = {}
    if config.cache_path:
      self._cache = self._read_cache(config.cache_path)

  # --- cache ------------------------------------------------------------------------------------

  @staticmethod
  def _read_cache(path: str) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
      return entries
    with open(path, "rb") as handle:  # bytes: a torn line may end inside a UTF-8 character
      data = handle.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: empty unless a kill cut a write short
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line.decode("utf-8"))
        entries[entry["key"]] = entry
      except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        logging.warning("Ignoring unreadable line %d of the judge cache %s.", number, path)
    if torn:
      # Cut off, or the next reply appended would share the torn line and be lost with it.
      logging.warning("The judge cache %s ends in a partial line of %d bytes (a run killed "
                      "mid-write): cutting it off; that answer is asked again.", path, len(torn))
      with open(path, "r+b") as handle:
        handle.truncate(len(data) - len(torn))
    logging.info("Judge cache %s holds %d replies.", path, len(entries))
    return entries

  def _remember(self, entry: dict[str, Any]) -> None:
    with self._lock:
      self._cache[entry["key"]] = entry
      if self.config.cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(self.config.cache_path)), exist_ok=True)
        with open(self.config.cache_path, "a", encoding="utf-8") as handle:
          handle.write(json.dumps(entry, ensure_ascii=False) + "\n")

  def _count(self, name: str, amount: int = 1) -> None:
    with self._lock:
      self.stats[name] += amount

  # --- HTTP -------------------------------------------------------------------------------------

  def _safe(self, text: str) -> str:
    """`text` with the API key scrubbed out (a server may echo it, a URL may hold it)."""
    return redaction.scrub(text, self._secrets)

  def _backoff(self, attempt: int, retry_after: str | None) -> float:
    delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
    delay *= 0.5 + 0.5 * random.random()  # jitter: concurrent clients do not retry in lockstep
    asked = retry_after_seconds(retry_after)
    if asked is not None:
      delay = max(delay, min(asked, self.config.max_backoff_s))
    return delay

  def _attempt(self, request: urllib.request.Request) -> str:
    """The reply text of one request, within `deadline_s` and `max_reply_bytes`.

    Raises:
      JudgeError: a refusal a retry cannot mend (HTTP 4xx other than 408 and 429).
      _RequestFailed: anything else (5xx, 408, 429, network errors, the deadline, an oversized
        reply, a 200 that is not a chat completion).
    """
    limit = self.config.max_reply_bytes
    with _Deadline(self.config.deadline_s) as deadline:
      try:
        with self._opener.open(request, timeout=self.config.timeout_s) as response:
          body = response.read(limit + 1)  # one byte more tells an oversized reply
      except urllib.error.HTTPError as error:
        detail = error.read(300).decode("utf-8", errors="replace").strip()
        if error.code < 500 and error.code not in RETRYABLE_STATUS:
          if error.code in AUTH_STATUS and not self.config.api_key:
            hint = (f"No API key was sent: set the environment variable {ENV_API_KEY} "
                    "(preferred) or pass --config.judge.api_key")
          else:
            hint = (f"Check the URL, the model name ({self.config.model!r}) and the API key "
                    f"({ENV_API_KEY})")
          # `from None`: the urllib error adds nothing to this message and holds the request.
          raise JudgeError(self._safe(f"The judge at {self.url} refused the request with HTTP "
                                      f"{error.code}: {detail!r}. {hint}.")) from None
        raise _RequestFailed(f"HTTP {error.code} {detail!r}",
                             error.headers.get("Retry-After") if error.headers else None) from None
      except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
        raise _RequestFailed(deadline.message if deadline.expired
                             else f"{type(error).__name__}: {error}") from None
    if deadline.expired:  # the read ended because its socket was shut: the body is cut short
      raise _RequestFailed(deadline.message)
    if len(body) > limit:
      raise _RequestFailed(f"a reply of more than judge.max_reply_bytes={limit} bytes")
    try:
      reply = _reply_content(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError):
      reply = None
    if reply is None:  # a proxy's error page, say: asking again may get the real answer
      raise _RequestFailed(f"HTTP 200 whose body is not a chat completion: {body[:120]!r}")
    return reply

  def _request_reply(self, payload: dict[str, Any]) -> str:
    """The reply text to `payload`; retries failed requests and raises JudgeError once they are
    spent."""
    data = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self.config.api_key:
      headers["Authorization"] = f"Bearer {self.config.api_key}"
    attempts = self.config.max_retries + 1
    last_error = ""
    for attempt in range(attempts):
      if attempt:
        self._count("retries")
      self._count("requests")
      request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
      try:
        return self._attempt(request)
      except _RequestFailed as failure:
        self._count("failed")
        last_error = self._safe(str(failure))
        retry_after = failure.retry_after
      if attempt + 1 < attempts:
        delay = self._backoff(attempt, retry_after)
        logging.warning("Judge request failed (%s); retry %d/%d in %.1f s.", last_error,
                        attempt + 1, self.config.max_retries, delay)
        time.sleep(delay)
    raise JudgeError(self._safe(
        f"The judge at {self.url} failed {attempts} time(s) in a row; last error: {last_error}. "
        f"Check that the server is up and reachable (timeout {self.config.timeout_s} s per read, "
        f"{self.config.deadline_s} s per request). Replies received so far are cached"
        + (f" in {self.config.cache_path}" if self.config.cache_path else
           " only in memory (set judge.cache_path to keep them)") + "."))

  # --- judging ----------------------------------------------------------------------------------

  def _ask(self, prompt: str, answer: str, images: Sequence[bytes], repeat: int) -> str:
    key = cache_key(self.config.model, prompt, answer, images, repeat)
    with self._lock:
      cached = self._cache.get(key)
    if cached is not None:
      self._count("cache_hits")
      return cached["reply"]
    payload = {"model": self.config.model,
               "messages": build_messages(prompt, images, self.config.image_detail),
               "temperature": self.config.temperature, "top_p": self.config.top_p,
               "max_tokens": self.config.max_tokens}
    reply = self._safe(self._request_reply(payload))  # a server may echo the key back
    self._remember({"key": key, "model": self.config.model, "repeat": repeat, "reply": reply})
    return reply

  def _grade(self, item: JudgeItem, repeat: int) -> tuple[int | None, str]:
    if self._abort.is_set():
      raise JudgeError("Stopped after an earlier judge request failed.")
    answer = candidate_text(item.answer, self.config.answer_only)
    prompt = RUBRIC.format(question=as_text(item.question).strip(),
                           reference=as_text(item.reference).strip(), answer=answer)
    images = [_image_bytes(image) for image in item.images]
    try:
      reply = self._ask(prompt, answer, images, repeat)
    except JudgeError:
      self._abort.set()
      raise
    grade = parse_grade(reply, self.config.min_score, self.config.max_score)
    if grade is None:
      self._count("malformed")
      logging.warning("Judge reply without a grade in [%d, %d]: %r", self.config.min_score,
                      self.config.max_score, reply[:200])
    return grade, reply

  def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
    """One Verdict per item, in order; `config.repeats` judgements each, `concurrency` at once.

    Raises:
      JudgeError: when a request still fails after its retries (replies already received stay
        in the cache).
    """
    repeats = self.config.repeats
    self._abort.clear()
    jobs = [(index, repeat) for index in range(len(items)) for repeat in range(repeats)]
    with concurrent.futures.ThreadPoolExecutor(self.config.concurrency) as pool:
      futures = [pool.submit(self._grade, items[index], repeat) for index, repeat in jobs]
      try:
        results = [future.result() for future in futures]
      except BaseException:
        self._abort.set()  # a dead judge fails fast instead of retrying every job in turn
        for future in futures:
          future.cancel()
        raise
    verdicts = []
    for index in range(len(items)):
      graded = results[index * repeats:(index + 1) * repeats]
      grades = tuple(grade for grade, _ in graded)
      valid = [grade for grade in grades if grade is not None]
      verdicts.append(Verdict(score=sum(valid) / len(valid) if valid else None, grades=grades,
                              replies=tuple(reply for _, reply in graded)))
    return verdicts

  def judge(self, item: JudgeItem) -> Verdict:
    return self.judge_many([item])[0]


def verdict_metrics(verdicts: Sequence[Verdict], prefix: str = "judge") -> dict[str, float]:
  """Summary of `verdicts`: the mean score over answers with a grade, the same with missing
  answers counted as 0 (MetaphorStar's averaging), and counts of missing answers and malformed
  replies."""
  scores = [v.score for v in verdicts if v.score is not None]
  total = len(verdicts)
  return {
      f"{prefix}/score": sum(scores) / len(scores) if scores else float("nan"),
      f"{prefix}/score_missing_as_zero": sum(scores) / total if total else float("nan"),
      f"{prefix}/missing": float(total - len(scores)),
      f"{prefix}/malformed_replies": float(sum(v.malformed for v in verdicts)),
      f"{prefix}/judged": float(total),
  }
