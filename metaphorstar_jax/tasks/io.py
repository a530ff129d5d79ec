"""Reading and writing task data: parquet and JSONL rows, images checked before use.

A folder holding several splits (Hugging Face's `data/train-*.parquet` next to `data/test-*`) is
read by split: the caller names the one it wants (training "train", evaluation "test" or else
"validation"), and a caller that names none is refused, so test rows are never trained on. Text is
UTF-8, strictly (a byte-order mark is allowed): a JSONL line that is not is a counted skip, a .json
file that is not is an error. Every error about a file names it.

Parquet needs pyarrow (imported only when a parquet file is touched). Images arrive as raw bytes,
Hugging Face image structs {"bytes": ..., "path": ...}, file paths (relative to a list of root
folders) or base64 strings; `load_image_bytes` returns the encoded bytes after decoding them once
in full, so a truncated or corrupt file is caught when reading, not mid-training.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from PIL import Image

from metaphorstar_jax.tasks.records import ReadStats, Record, RecordError

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
PARQUET_BATCH_ROWS = 64
_MAX_PATH_LENGTH = 4096
# The words that name a split in a data file's path, as Hugging Face `datasets` reads them: a
# keyword between separators (- _ . / or either end), e.g. data/train-00000-of-00001.parquet.
SPLIT_KEYWORDS = {
  "train": ("train", "training"),
  "validation": ("validation", "valid", "val", "dev"),
  "test": ("test", "testing", "eval", "evaluation"),
}
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation")  # the first a folder holds is read
_SPLIT_OF_KEYWORD = {word: split for split, words in SPLIT_KEYWORDS.items() for word in words}
_SPLIT_WORD = re.compile(
  r"(?:^|[-_./])(" + "|".join(sorted(_SPLIT_OF_KEYWORD, key=len, reverse=True)) + r")(?=[-_./]|$)"
)
_LISTED_FILES = 4  # an error lists this many files of each split, then a count


@dataclasses.dataclass(frozen=True)
class Row:
  """One raw row: where it came from, its fields (None if unreadable) and why it is unreadable."""

  source: str
  index: int
  fields: dict[str, Any] | None
  error: str = ""

  @property
  def default_id(self) -> str:
    return f"{os.path.splitext(os.path.basename(self.source))[0]}-{self.index}"


def split_of(relative_path: str) -> str | None:
  """The split ("train", "validation", "test") a data file's path names, or None; the word
  nearest the file name wins (train/test-0.parquet is "test")."""
  words = _SPLIT_WORD.findall(relative_path.replace(os.sep, "/").lower())
  return _SPLIT_OF_KEYWORD[words[-1]] if words else None


def table_files(path: str | Sequence[str], split: str | Sequence[str] | None = None) -> list[str]:
  """The data files `path` names: itself, the files of a list as given, or the parquet files
  under a folder (else its JSONL, else its .json files).

  Args:
    path: a data file, a folder, or a list of data files (what `table_files` returned).
    split: for a folder whose files name two or more splits, the split to read, or several in
      order of preference (EVAL_SPLITS); a folder of one split, or none, is read whole.

  Raises:
    FileNotFoundError: no such path, or no data file under it.
    ValueError: a folder of several splits without `split` (reading it whole would mix them),
      without any of the splits asked for, or with files that name no split beside them. The
      message lists the files.
  """
  if not isinstance(path, (str, os.PathLike)):
    return [str(file) for file in path]
  if os.path.isfile(path):
    return [str(path)]
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"Data path {path!r} does not exist; pass a parquet/JSONL file or a folder."
    )
  found = {suffix: [] for suffix in TABLE_SUFFIXES}
  for folder, _, names in os.walk(path):
    for name in names:
      suffix = os.path.splitext(name)[1]
      if suffix in found:
        found[suffix].append(os.path.join(folder, name))
  files = next((sorted(found[suffix]) for suffix in TABLE_SUFFIXES if found[suffix]), None)
  if files is None:
    raise FileNotFoundError(f"No .parquet, .jsonl or .json file under {path!r}.")
  by_split = collections.defaultdict(list)
  for file in files:
    by_split[split_of(os.path.relpath(file, path))].append(file)
  named = sorted(name for name in by_split if name is not None)
  if len(named) < 2:
    return files
  wanted = (split,) if isinstance(split, str) else tuple(split or ())
  unknown = [name for name in wanted if name not in SPLIT_KEYWORDS]
  if unknown:
    raise ValueError(f"Unknown split(s) {unknown}; the splits are {sorted(SPLIT_KEYWORDS)}.")
  listing = _list_splits(path, by_split)
  if None in by_split:
    raise ValueError(f"{path} holds the splits {', '.join(named)} and files that name no split "
                     f"({listing}). Point the data path at one split's files, or move the others.")
  if not wanted:
    raise ValueError(f"{path} holds the splits {', '.join(named)} ({listing}); read whole, they "
                     "would be mixed (test rows trained on). Point the data path at one split's "
                     "file or folder, or have the caller read it by split (split='train').")
  chosen = next((name for name in wanted if name in by_split), None)
  if chosen is None:
    raise ValueError(f"{path} holds the splits {', '.join(named)} ({listing}), none of the "
                     f"{' or '.join(wanted)} split asked for. Point the data path at the files "
                     "to read.")
  return by_split[chosen]


def _list_splits(root: str, by_split: Mapping[str | None, list[str]]) -> str:
  """'train: data/train-0.parquet, ...; test: ...' with at most _LISTED_FILES names each."""
  parts = []
  for name, files in sorted(by_split.items(), key=lambda item: item[0] or ""):
    shown = [os.path.relpath(file, root) for file in files[:_LISTED_FILES]]
    more = f" and {len(files) - _LISTED_FILES} more" if len(files) > _LISTED_FILES else ""
    parts.append(f"{name or 'no split'}: {', '.join(shown)}{more}")
  return "; ".join(parts)


def iter_rows(path: str | Sequence[str], split: str | Sequence[str] | None = None) -> Iterator[Row]:
  """Yields the rows of every data file `path` names (see `table_files`), in file order then row
  order."""
  for file in table_files(path, split):
    if file.endswith(".parquet"):
      yield from _parquet_rows(file)
    elif file.endswith(".jsonl"):
      yield from _jsonl_rows(file)
    else:
      yield from _json_rows(file)


def _parquet_rows(file: str) -> Iterator[Row]:
  try:
    import pyarrow.parquet as pq
  except ImportError as error:
    raise ImportError(f"Reading {file} needs pyarrow: pip install pyarrow.") from error
  try:
    parquet = pq.ParquetFile(file)
  except Exception as error:  # pyarrow raises several types for a damaged file
    raise ValueError(f"Cannot open parquet file {file}: {error}") from error
  batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
  index = 0
  while True:
    try:
      batch = next(batches, None)
      rows = [] if batch is None else batch.to_pylist()
    except Exception as error:  # a damaged page: OSError, ArrowInvalid, ...
      raise ValueError(f"Cannot read parquet file {file} past row {index}: {error}") from error
    if batch is None:
      return
    for fields in rows:
      yield Row(file, index, fields)
      index += 1


def _jsonl_rows(file: str) -> Iterator[Row]:
  with open(file, "rb") as lines:  # bytes: each line is decoded on its own, strictly
    for index, line in enumerate(lines):
      if index == 0 and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8):]
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as error:
        yield Row(file, index, None, f"not UTF-8 text: {error}")
        continue
      if not text.strip():
        continue
      try:
        fields = json.loads(text)
      except json.JSONDecodeError as error:
        yield Row(file, index, None, f"malformed JSON line: {error}")
        continue
      if not isinstance(fields, dict):
        yield Row(file, index, None, f"JSON line is a {type(fields).__name__}, not an object")
        continue
      yield Row(file, index, fields)


def _json_rows(file: str) -> Iterator[Row]:
  with open(file, "rb") as handle:
    data = handle.read()
  try:
    data = json.loads(data.decode("utf-8-sig"))  # -sig: a byte-order mark is allowed
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"Cannot read JSON file {file}: {error}") from error
  if isinstance(data, dict):
    data = data.get("data", [data])
  if not isinstance(data, list):
    raise ValueError(f"JSON file {file} holds a {type(data).__name__}; expected a list of rows, "
                     "an object with a 'data' list, or one row object.")
  for index, fields in enumerate(data):
    yield Row(
      file,
      index,
      fields if isinstance(fields, dict) else None,
      "" if isinstance(fields, dict) else "entry is not an object",
    )


def read_records(
  path: str | Sequence[str],
  stats: ReadStats | None,
  parse: Callable[[Row, str], Record | list[Record]],
) -> Iterator[Record]:
  """Yields `parse(row, record_id)` for every row of `path` (a file, a folder of one split, or
  the files `table_files` chose), counting skips and repeated record ids in `stats`.

  A row is skipped (counted under its reason, logged with its id) when it cannot be read (not
  UTF-8, not JSON, not an object) or `parse` raises RecordError; `parse` may return one record or
  several. A record whose id an earlier one has is kept and counted in `stats.duplicate_ids`.
  """
  stats = stats if stats is not None else ReadStats(source=str(path))
  seen_ids: set[str] = set()
  for row in iter_rows(path):
    record_id = str((row.fields or {}).get("id") or row.default_id)
    if row.fields is None:
      stats.skip(record_id, "unreadable row", row.error)
      continue
    try:
      parsed = parse(row, record_id)
    except RecordError as error:
      stats.skip(record_id, error.reason, error.detail)
      continue
    parsed = parsed if isinstance(parsed, list) else [parsed]
    for record in parsed:
      if record.id in seen_ids:
        stats.duplicate_ids[record.id] += 1
      seen_ids.add(record.id)
    stats.read += len(parsed)
    yield from parsed


def require(fields: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = object) -> Any:
  """fields[name], or RecordError('missing field ...') if absent/None/empty or of the wrong type."""
  value = fields.get(name)
  if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
    raise RecordError(f"missing field '{name}'")
  if not isinstance(value, kind):
    raise RecordError(f"bad field '{name}'", f"expected {kind}, got {type(value).__name__}")
  return value


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None):
  """Temporarily sets PIL's decompression-bomb limit (None lifts it, for huge transit maps)."""
  previous = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = max_pixels
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def check_image_bytes(data: bytes, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> None:
  """Decodes `data` fully; raises RecordError('corrupt image') if PIL cannot."""
  try:
    with _pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
      image.load()
  except (
    Exception
  ) as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
    raise RecordError("corrupt image", f"{type(error).__name__}: {error}") from error


def _resolve_path(path: str, roots: Sequence[str]) -> str | None:
  path = path[len("file://") :] if path.startswith("file://") else path
  if os.path.isabs(path):
    return path if os.path.isfile(path) else None
  for root in roots:
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
      return candidate
  return None


def load_image_bytes(
  value: Any,
  roots: Sequence[str] = (),
  check: bool = True,
  max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
  cache: dict[str, bytes] | None = None,
) -> bytes | Image.Image:
  """One image field -> encoded bytes (or the PIL image it already is).

  Args:
    value: bytes, {"bytes", "path"} struct, file path, "data:image/...;base64," or bare base64.
    roots: folders that relative paths are tried against, in order.
    check: decode once in full to catch corrupt data.
    max_pixels: PIL's size limit while checking (None: no limit).
    cache: path -> bytes, to read a file shared by many rows once.

  Raises:
    RecordError: 'missing image' (no data), 'image not found' or 'corrupt image'.
  """
  if isinstance(value, Image.Image):
    return value
  if isinstance(value, Mapping):
    data = value.get("bytes")
    value = data if data else value.get("path")
  if value is None or (isinstance(value, (str, bytes)) and not value):
    raise RecordError("missing image")
  if isinstance(value, (bytearray, memoryview)):
    value = bytes(value)
  if isinstance(value, str):
    key = value if len(value) < _MAX_PATH_LENGTH else None  # cache paths, not base64 payloads
    if cache is not None and key in cache:
      return cache[key]
    value = _image_bytes_from_string(value, roots)
    if check:
      check_image_bytes(value, max_pixels)
    if cache is not None and key is not None:
      cache[key] = value
    return value
  if not isinstance(value, bytes):
    raise RecordError("bad image field", f"type {type(value).__name__}")
  if check:
    check_image_bytes(value, max_pixels)
  return value


def _image_bytes_from_string(value: str, roots: Sequence[str]) -> bytes:
  text = value.strip()
  if text.startswith("data:image"):
    text = text.split(",", 1)[-1]
  elif len(text) < _MAX_PATH_LENGTH:  # longer strings are base64 payloads, not paths
    path = _resolve_path(text, roots)
    if path is not None:
      with open(path, "rb") as handle:
        return handle.read()
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as error:
    raise RecordError(
      "image not found", f"{value[:120]!r} is neither an existing file nor base64"
    ) from error


def to_pil(image: Any) -> Image.Image:
  """A record image (bytes, PIL image or file path) as a loaded RGB-or-original-mode PIL image."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview)):
    with _pixel_limit(None):
      opened = Image.open(io.BytesIO(bytes(image)))
      opened.load()
    return opened
  if isinstance(image, (str, os.PathLike)):
    with _pixel_limit(None), Image.open(image) as opened:
      opened.load()
      return opened.copy()
  raise TypeError(
    f"A record image must be bytes, a PIL image or a path, got {type(image).__name__}."
  )


def png_bytes(image: Image.Image) -> bytes:
  """PNG encoding of a PIL image."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes rows as JSON lines (UTF-8, non-ASCII kept); returns the path."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as handle:
    for row in rows:
      handle.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def write_parquet(path: str, rows: Sequence[Mapping[str, Any]], schema: Any = None) -> str:
  """Writes rows to one parquet file (pyarrow infers the schema unless given); returns the path."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  table = pa.Table.from_pylist(list(rows), schema=schema)
  pq.write_table(table, path)
  return path


def hf_images_schema_field(name: str = "images") -> Any:
  """The parquet field of a Hugging Face `Sequence(Image())` column: list<struct<bytes, path>>."""
  import pyarrow as pa

  return pa.field(name, pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
