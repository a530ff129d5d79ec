"""A training run's policy as an HF Qwen2.5-VL checkpoint directory, written one tensor at a time.

Each tensor is read (from in-memory params, or from an Orbax step: only the policy parameters,
never the optimizer state or the KL reference copy), converted to the HF layout by the name
table of `models/qwen2_5_vl/hf_checkpoint.py` and appended to its safetensors shard before the
next is read, so the host holds about one tensor whatever the model size, and the saving run's
mesh (a pod's, say) need not match this machine's. The directory holds config.json of the run's
model, generation_config.json, the safetensors shards and their index, and the tokenizer,
processor and chat template: copied from `model.hf_path` when the run started from an HF
checkpoint (and used its tokenizer), else the project's own. It is assembled in a scratch folder
next to the destination and renamed into place last, so a failed export leaves nothing
half-written.

`python -m metaphorstar_jax.export` runs `export_checkpoint`; the trainer calls `export_params`
(`config.export.every` / `config.export.at_end`, to workdir/hf/step_N).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np
from absl import logging
from flax import nnx

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.data.chat_template import CHAT_TEMPLATE
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.models.qwen2_5_vl import hf_checkpoint
from metaphorstar_jax.training import builders, checkpoints
from metaphorstar_jax.training.workdir import RUN_CONFIG

DTYPES = ("float32", "bfloat16", "float16")
# safetensors' names of the dtypes a checkpoint may hold.
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def step_dir(workdir: str, step: int) -> str:
  """Where the trainer's exports go: workdir/hf/step_N."""
  return os.path.join(workdir, "hf", f"step_{step}")


# --- what the run was --------------------------------------------------------------------------

def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote to `run_dir`/config.json."""
  path = os.path.join(run_dir, RUN_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {RUN_CONFIG} in {run_dir}: the run's config says which model "
                            "it trained. Pass the run folder that train wrote (the workdir).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def uses_hf_tokenizer(config) -> bool:
  """Whether the run's tokenizer (and processor files) came from `model.hf_path`."""
  return bool(config.model.hf_path) and config.model.tokenizer not in ("small", "qwen")


# --- writing ------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged_directory(out_dir: str, *, replace: bool = False) -> Iterator[str]:
  """Yields a fresh scratch folder next to `out_dir` that becomes `out_dir` when the block ends
  without an error (and is deleted when it raises). An existing `out_dir` must be empty unless
  `replace`, which swaps the old contents out only once the new ones are complete."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not replace:
    if not os.path.isdir(out_dir) or os.listdir(out_dir):
      raise FileExistsError(f"--out {out_dir} exists and is not an empty folder; pick a new "
                            "folder (nothing was written).")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's folder is private; an export is not
  try:
    yield scratch
  except BaseException:
    shutil.rmtree(scratch, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.rename(out_dir, os.path.join(old, "contents"))
  os.rename(scratch, out_dir)
  if old is not None:
    shutil.rmtree(old)


def write_safetensors(path: str, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterator[np.ndarray]) -> int:
  """Writes one safetensors file whose header is planned from `specs` (name, shape, dtype)
  and whose data are streamed from `tensors`, which yields the arrays in the same order; only
  one array is held at a time. Returns the bytes of tensor data written."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in specs:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, shape, dtype), tensor in zip(specs, tensors, strict=True):
      if tensor.shape != tuple(shape) or tensor.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: got {tensor.dtype}{list(tensor.shape)}, planned "
                         f"{np.dtype(dtype)}{list(shape)}.")
      f.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
  return offset


def write_hf_checkpoint(out_dir: str, model_config: qwen2_5_vl.Qwen2_5_VLConfig,
                        read: Callable[[hf_checkpoint.Entry], np.ndarray], *,
                        write_side_files: Callable[[str], None], dtype: str | None = None,
                        max_shard_bytes: int = 5 * 2**30, replace: bool = False) -> dict:
  """Writes an HF checkpoint directory, one tensor at a time.

  Args:
    out_dir: the directory to create (see `staged_directory` for an existing one).
    model_config: the architecture; its name table decides every tensor's name and layout.
    read: our-layout value of one name-table entry (one layer's slice of a stacked parameter,
      `hf_checkpoint.entry_value`), as a host array; called once per entry, every layer of one
      parameter in a row, on every process (each joins any cross-host gather; process 0 writes).
    write_side_files: writes tokenizer and processor files into the folder it is given.
    dtype: dtype on disk (one of DTYPES); None keeps each tensor's own.
    max_shard_bytes: the largest shard file.
    replace: overwrite an existing export (the trainer's, on resume).

  Returns:
    {"out_dir", "files": the shard files, "tensors": count, "bytes": tensor data written}.
  """
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"Unknown export dtype {dtype!r}; use one of {DTYPES}.")
  flat = dict(nnx.to_flat_state(nnx.state(qwen2_5_vl.abstract_model(model_config), nnx.Param)))
  table = qwen2_5_vl.name_table(model_config)
  # Each parameter's tensors (a stack's layers) in a row, so a reader holds one at a time.
  first = {}
  for i, e in enumerate(table):
    first.setdefault(e.path, i)
  table = sorted(table, key=lambda e: first[e.path])
  disk = {e.path: np.dtype(dtype or flat[e.path].dtype) for e in table}
  planned = {e.path: jax.ShapeDtypeStruct(flat[e.path].shape, disk[e.path]) for e in table}
  shards = hf_checkpoint._plan_shards(table, planned, max_shard_bytes)
  names = list(hf_checkpoint._shard_names(len(shards)))
  is_writer = jax.process_index() == 0

  def hf_tensors(shard):
    for entry in shard:
      value = np.asarray(read(entry)).astype(disk[entry.path], copy=False)
      yield hf_checkpoint._to_hf(entry, value, model_config)

  def write_all(folder):
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
      specs = [(e.hf_name, hf_checkpoint._hf_shape(
          e, hf_checkpoint._tensor_shape(e, flat[e.path].shape), model_config), disk[e.path])
               for e in shard]
      if is_writer:
        total += write_safetensors(os.path.join(folder, file_name), specs, hf_tensors(shard))
      else:
        for _ in hf_tensors(shard):
          pass
      weight_map.update({e.hf_name: file_name for e in shard})
    return weight_map, total

  if not is_writer:
    write_all(None)
    return {"out_dir": os.path.abspath(out_dir), "files": names, "tensors": len(table)}
  with staged_directory(out_dir, replace=replace) as folder:
    weight_map, total = write_all(folder)
    hf_config = qwen2_5_vl.to_hf_dict(model_config)
    hf_config["torch_dtype"] = dtype or hf_config["torch_dtype"]
    files = {"config.json": hf_config,
             "generation_config.json": hf_checkpoint.generation_config(model_config),
             hf_checkpoint.INDEX_FILE: {"metadata": {"total_size": total},
                                        "weight_map": weight_map}}
    for name, contents in files.items():
      with open(os.path.join(folder, name), "w") as f:
        json.dump(contents, f, indent=2)
    write_side_files(folder)
  logging.info("Exported %d tensors (%.1f MB) in %d shard(s) to %s.", len(table), total / 1e6,
               len(names), out_dir)
  return {"out_dir": os.path.abspath(out_dir), "files": names, "tensors": len(table),
          "bytes": total}


def side_file_writer(config, processor=None) -> Callable[[str], None]:
  """The tokenizer / processor / chat-template writer for a run's export: copies the files of
  `model.hf_path` when the run used its tokenizer, else saves the run's own processor
  (`processor`, or the one the trainer builds from `config`)."""
  if uses_hf_tokenizer(config):
    source = config.model.hf_path
    present = [n for n in hf_checkpoint.SIDE_FILES if os.path.exists(os.path.join(source, n))]
    if "tokenizer.json" not in present:
      raise FileNotFoundError(f"model.hf_path {source!r} has no tokenizer.json to export with "
                              "the weights.")

    def copy(folder):
      for name in present:
        shutil.copy(os.path.join(source, name), os.path.join(folder, name))
    return copy
  if processor is None:
    processor = builders.build_processor(config)

  def save(folder):
    processor.save_pretrained(folder)
    with open(os.path.join(folder, CHAT_TEMPLATE_FILE), "w") as f:
      f.write(CHAT_TEMPLATE)
  return save


def export_params(params, model_config: qwen2_5_vl.Qwen2_5_VLConfig, out_dir: str, config,
                  processor=None, *, dtype: str | None = None, replace: bool = False) -> dict:
  """Exports in-memory policy params (an nnx.State of the model, sharded or not, on every host)
  of the run `config`; see `write_hf_checkpoint` for the result."""
  flat = dict(nnx.to_flat_state(params))
  return write_hf_checkpoint(
      out_dir, model_config,
      lambda entry: sharding_lib.to_host(hf_checkpoint.entry_value(entry,
                                                                   flat[entry.path].get_value())),
      write_side_files=side_file_writer(config, processor), dtype=dtype, replace=replace)


def export_checkpoint(checkpoint: str, out_dir: str, *, step: int | None = None,
                      dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
  """Exports the policy of a training checkpoint, reading its params one tensor at a time.

  Args:
    checkpoint: a run folder (with checkpoints/ and config.json), its checkpoints/ folder or one
      step's folder (which then picks the step).
    out_dir: a new (or empty) folder for the HF checkpoint.
    step: the checkpoint step; None: the one `checkpoint` names, else the latest.
    dtype: dtype on disk (DTYPES); None keeps the saved parameter dtype.
    max_shard_bytes: the largest shard file.

  Returns:
    `write_hf_checkpoint`'s summary plus "step" and "checkpoint" (the Orbax folder).
  """
  manager_dir, run_dir, step = checkpoints.checkpoint_step(checkpoint, step)
  config = load_run_config(run_dir)
  model_config = builders.run_model_config(config)
  write_side_files = side_file_writer(config)
  saved = checkpoints.SavedArrays(manager_dir, step)
  keys = lambda entry: ("params",) + tuple(str(k) for k in entry.path)
  table = qwen2_5_vl.name_table(model_config)
  flat = dict(nnx.to_flat_state(nnx.state(qwen2_5_vl.abstract_model(model_config), nnx.Param)))
  wrong = []
  for entry in table:
    try:
      shape = tuple(saved.metadata(keys(entry)).shape)
    except KeyError:
      shape = None
    if shape != tuple(flat[entry.path].shape):
      wrong.append(f"{'/'.join(keys(entry))}: saved {shape}, model {tuple(flat[entry.path].shape)}")
  if wrong:
    raise ValueError(f"The checkpoint of step {step} under {manager_dir} does not match the "
                     f"run's model ({len(wrong)} parameter(s), e.g. {wrong[:3]}); was the "
                     "run's config.json changed?")
  held = {}  # the one parameter being written: a stack's layers are read once for all of them

  def read(entry):
    if entry.path not in held:
      held.clear()
      held[entry.path] = saved.read(keys(entry))
    return hf_checkpoint.entry_value(entry, held[entry.path])

  summary = write_hf_checkpoint(out_dir, model_config, read,
                                write_side_files=write_side_files, dtype=dtype,
                                max_shard_bytes=max_shard_bytes)
  return {**summary, "step": step, "checkpoint": manager_dir}
