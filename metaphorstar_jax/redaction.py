"""The one place that knows which settings are secret, and takes them out of what we write.

A run folder, a W&B dashboard, evaluation results and log lines are all shared more widely than
the machine the run is on, so nothing a writer hands them may hold a credential:

    json_text = redaction.redact(config).to_json_best_effort()    # config.json, W&B, settings
    message = redaction.scrub(message, [api_key])                 # a log line, an error message

A setting is secret when a word of its name (split at "_", "-", "." and camelCase humps, lower
case) is `token`, `secret` or `password`, or two neighbouring words are `api` and `key` (or one is
`apikey`); or when its name or dotted path is in SECRET_FIELDS. Matching words, not substrings,
keeps `model.tokenizer` and `rl.max_new_tokens` readable: `export` reads `model.tokenizer` back
from config.json. Only non-empty strings are replaced: a number or list under a secret-looking
name (`stop_token_ids`) is not a credential, and an empty value tells the reader none was set.

Reading a run back never needs a secret from disk: the judge's key comes from
METAPHORSTAR_JUDGE_API_KEY or the flag again (judge.JudgeConfig.resolve says so when it is
missing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

REDACTED = "<redacted>"
# Words of a setting's name that mark it secret (see the module docstring for the matching).
SECRET_WORDS = ("token", "secret", "password")
# Secret settings the word rule misses, by name or by dotted path. judge.api_key is the rule's
# too; it is named here because it is the one this project is known to carry.
SECRET_FIELDS = ("judge.api_key", "authorization", "credentials", "private_key", "access_key",
                 "passphrase")
# Only our own environment variables are treated as known secret values (see secret_values).
ENV_PREFIX = "METAPHORSTAR_"
MIN_SCRUB_LENGTH = 4  # shorter secret values are not scrubbed out of free text (see scrub)

_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_\-.\s]+")


def _words(name: str) -> list[str]:
  return [w for w in _SEPARATORS.split(_HUMP.sub("_", name).lower()) if w]


def is_secret(path: str) -> bool:
  """Whether the setting at dotted `path` (e.g. "judge.api_key", or a bare name) is secret."""
  name = path.rsplit(".", 1)[-1]
  if path.lower() in SECRET_FIELDS or name.lower() in SECRET_FIELDS:
    return True
  words = _words(name)
  if any(w in SECRET_WORDS or w == "apikey" for w in words):
    return True
  return any(a == "api" and b == "key" for a, b in zip(words, words[1:]))


def scrub(text: str, secrets: Iterable[str]) -> str:
  """`text` with every occurrence of each string in `secrets` replaced by REDACTED, in one pass
  (longest first). Values shorter than MIN_SCRUB_LENGTH are left: no credential is that short,
  and replacing every "a" in a log line would make it unreadable."""
  secrets = sorted({s for s in secrets if len(s) >= MIN_SCRUB_LENGTH}, key=len, reverse=True)
  if not secrets or not text:
    return text
  return re.sub("|".join(map(re.escape, secrets)), REDACTED, text)


def secret_values(values: Any = None, environ: Mapping[str, str] | None = None) -> list[str]:
  """The non-empty secret strings held by `values` (a config or nested mapping) and by our own
  environment variables (METAPHORSTAR_* with a secret name, e.g. METAPHORSTAR_JUDGE_API_KEY)."""
  found: list[str] = []

  def visit(value: Any, path: str) -> None:
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      for key, item in value.items():
        visit(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
      for item in value:
        visit(item, path)
    elif isinstance(value, str) and value and value != REDACTED and is_secret(path):
      found.append(value)

  if values is not None:
    visit(values, "")
  environ = os.environ if environ is None else environ
  found += [value for name, value in environ.items()
            if name.startswith(ENV_PREFIX) and value and is_secret(name)]
  return list(dict.fromkeys(found))


def redact(values: Any, secrets: Iterable[str] | None = None) -> Any:
  """A copy of `values` safe to write: every non-empty string under a secret name becomes
  REDACTED, and each known secret value is scrubbed out of every other string.

  Args:
    values: a ConfigDict (a ConfigDict comes back), a mapping (a dict comes back), a list or
      tuple, or a scalar; nested freely.
    secrets: the known secret values; None takes `secret_values(values)` (its own secret fields
      and our secret environment variables).
  """
  secrets = secret_values(values) if secrets is None else [s for s in secrets if s]

  def copy(value: Any, path: str) -> Any:
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      return {key: copy(item, f"{path}.{key}" if path else str(key))
              for key, item in value.items()}
    if isinstance(value, (list, tuple)):
      return type(value)(copy(item, path) for item in value)
    if isinstance(value, str) and value:
      return REDACTED if is_secret(path) else scrub(value, secrets)
    return value

  copied = copy(values, "")
  if isinstance(values, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(copied)
  return copied
