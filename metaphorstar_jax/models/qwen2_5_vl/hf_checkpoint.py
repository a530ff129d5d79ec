"""Weights both ways between HF safetensors checkpoints and the NNX model, driven by one name table.

Loading reads tensor by tensor (and, with a mesh, slice by slice straight into each device's shard),
so no host ever holds a whole large checkpoint. The HF tensors of layer i of the decoder or block i
of the ViT are slice i of our stacked (L, ...) parameters. Saving writes the legacy key layout that
every transformers version since 4.49 reads, in shards with an index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from metaphorstar_jax import sharding as sharding_lib
from metaphorstar_jax.models.qwen2_5_vl import config as config_lib
from metaphorstar_jax.models.qwen2_5_vl.model import Qwen2_5_VL

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied along when exporting from a checkpoint directory we were loaded from.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
              "chat_template.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its legacy HF name, its path in our parameter tree, and how the layouts differ.

  kind: 'copy' (same layout), 'linear' (HF (out, in) ↔ our kernel (in, out)) or 'patch'
  (HF Conv3d (D, C, Tp, P, P) ↔ our kernel (C·Tp·P·P, D)).
  layer: for a decoder layer or ViT block, whose parameters we stack on a leading axis, the
  slice of our parameter that this tensor is; None for the rest.
  """

  hf_name: str
  path: tuple[str, ...]
  kind: str
  layer: int | None = None


def _linear(hf_prefix: str, path: tuple, bias: bool, layer: int | None = None) -> list[Entry]:
  entries = [Entry(f"{hf_prefix}.weight", path + ("kernel",), "linear", layer)]
  if bias:
    entries.append(Entry(f"{hf_prefix}.bias", path + ("bias",), "copy", layer))
  return entries


def _norm(hf_prefix: str, path: tuple, layer: int | None = None) -> Entry:
  return Entry(f"{hf_prefix}.weight", path + ("scale",), "copy", layer)


def name_table(config: config_lib.Qwen2_5_VLConfig) -> list[Entry]:
  """Every parameter of the model for `config`, in checkpoint order."""
  table = [Entry("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch")]
  for i in range(config.vision.depth):
    hf, ours = f"visual.blocks.{i}", ("visual", "blocks")
    table += [_norm(f"{hf}.norm1", ours + ("norm1",), i),
              _norm(f"{hf}.norm2", ours + ("norm2",), i)]
    for name in ("qkv", "proj"):
      table += _linear(f"{hf}.attn.{name}", ours + ("attn", name), bias=True, layer=i)
    for name in ("gate_proj", "up_proj", "down_proj"):
      table += _linear(f"{hf}.mlp.{name}", ours + ("mlp", name), bias=True, layer=i)
  table.append(_norm("visual.merger.ln_q", ("visual", "merger", "ln_q")))
  table += _linear("visual.merger.mlp.0", ("visual", "merger", "mlp_in"), bias=True)
  table += _linear("visual.merger.mlp.2", ("visual", "merger", "mlp_out"), bias=True)

  table.append(Entry("model.embed_tokens.weight", ("language_model", "embed_tokens", "embedding"),
                     "copy"))
  for i in range(config.text.num_hidden_layers):
    hf, ours = f"model.layers.{i}", ("language_model", "layers")
    table += [_norm(f"{hf}.input_layernorm", ours + ("input_layernorm",), i),
              _norm(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",), i)]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      table += _linear(f"{hf}.self_attn.{name}", ours + ("self_attn", name),
                       bias=name != "o_proj", layer=i)
    for name in ("gate_proj", "up_proj", "down_proj"):
      table += _linear(f"{hf}.mlp.{name}", ours + ("mlp", name), bias=False, layer=i)
  table.append(_norm("model.norm", ("language_model", "norm")))
  if not config.tie_word_embeddings:
    table += _linear("lm_head", ("lm_head",), bias=False)
  return table


# transformers >= 4.52 in-memory names -> the legacy names of the table.
_MODERN_TO_LEGACY = ((re.compile(r"^model\.visual\."), "visual."),
                     (re.compile(r"^model\.language_model\."), "model."))


def legacy_name(name: str) -> str:
  for pattern, replacement in _MODERN_TO_LEGACY:
    name = pattern.sub(replacement, name)
  return name


class CheckpointReader:
  """Random access to the tensors of an HF checkpoint directory, by legacy name."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    index_path = os.path.join(self.directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(self.directory, SINGLE_FILE)):
      with safe_open(os.path.join(self.directory, SINGLE_FILE), framework="numpy") as f:
        weight_map = {name: SINGLE_FILE for name in f.keys()}
    else:
      raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {self.directory}: expected "
                              "an HF safetensors checkpoint directory.")
    self.files = {legacy_name(name): (file, name) for name, file in weight_map.items()}
    self._handles = {}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def _slice(self, name: str):
    file, stored_name = self.files[name]
    if file not in self._handles:
      path = os.path.join(self.directory, file)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{INDEX_FILE} in {self.directory} lists {file}, which is missing.")
      self._handles[file] = safe_open(path, framework="numpy")
    return self._handles[file].get_slice(stored_name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    tensor = self._slice(name)
    return tensor[index] if index is not None else tensor[:]

  def close(self):
    self._handles.clear()


def _tensor_shape(entry: Entry, parameter_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the part of our parameter that `entry` is (one layer's of a stacked one)."""
  return parameter_shape if entry.layer is None else parameter_shape[1:]


def entry_value(entry: Entry, parameter):
  """The part of a parameter's value (an array, ours) that `entry` names: one layer's slice of a
  stacked parameter, else all of it."""
  return parameter if entry.layer is None else parameter[entry.layer]


def _hf_shape(entry: Entry, our_shape: tuple[int, ...], config) -> tuple[int, ...]:
  if entry.kind == "linear":
    return tuple(reversed(our_shape))
  if entry.kind == "patch":
    v = config.vision
    return (our_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return our_shape


def _read_as_ours(reader: CheckpointReader, entry: Entry, index: tuple[slice, ...],
                  dtype) -> np.ndarray:
  """The part `index` (in our layout) of one tensor, read from disk without loading the rest."""
  if entry.kind == "linear":
    block = reader.read(entry.hf_name, (index[1], index[0])).T
  elif entry.kind == "patch":
    rows = reader.read(entry.hf_name, (index[1],))
    block = rows.reshape(rows.shape[0], -1).T[index[0]]
  else:
    block = reader.read(entry.hf_name, index)
  return np.asarray(block).astype(dtype)


def _read_parameter(reader: CheckpointReader, entries: Sequence[Entry],
                    index: tuple[slice, ...], dtype) -> np.ndarray:
  """The part `index` of one parameter: of its one tensor, or, when it stacks layers (entries
  in layer order), of each tensor of the layers index[0] selects."""
  if entries[0].layer is None:
    return _read_as_ours(reader, entries[0], index, dtype)
  return np.stack([_read_as_ours(reader, entry, index[1:], dtype) for entry in entries[index[0]]])


def _check_tensors(reader: CheckpointReader, table: Sequence[Entry], shapes: dict, config):
  missing = [e.hf_name for e in table if e.hf_name not in reader]
  if missing:
    raise ValueError(f"Checkpoint {reader.directory} lacks {len(missing)} tensor(s) the config "
                     f"needs, e.g. {missing[:5]}. Is it a Qwen2.5-VL checkpoint matching its "
                     "config.json (tie_word_embeddings, layer counts)?")
  wrong = []
  for entry in table:
    expected = _hf_shape(entry, _tensor_shape(entry, shapes[entry.path]), config)
    found = reader.shape(entry.hf_name)
    if found != expected:
      wrong.append(f"{entry.hf_name}: file {found}, config {expected}")
  if wrong:
    raise ValueError(f"Checkpoint {reader.directory} disagrees with its config on "
                     f"{len(wrong)} shape(s): {wrong[:5]}.")
  known = {e.hf_name for e in table} | {"lm_head.weight"}
  extra = sorted(set(reader.files) - known)
  if extra:
    logging.warning("Ignoring %d checkpoint tensor(s) the model does not use, e.g. %s.",
                    len(extra), extra[:5])


def abstract_model(config: config_lib.Qwen2_5_VLConfig) -> Qwen2_5_VL:
  """The model with shapes and dtypes only; no memory is allocated."""
  return nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))


def from_pretrained(path: str | os.PathLike, *, dtype="float32", param_dtype=None,
                    mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, PartitionSpec]] = sharding_lib.PARAMETER_RULES,
                    remat: bool = False, remat_offload: bool = False) -> Qwen2_5_VL:
  """Loads an HF Qwen2.5-VL checkpoint directory into the NNX model.

  Args:
    path: local directory with config.json and model.safetensors (or shards plus index); legacy
      or transformers >= 4.52 tensor names; bf16 or fp32 on disk.
    dtype: compute dtype ('float32' or 'bfloat16').
    param_dtype: parameter dtype; defaults to `dtype`.
    mesh: when given, each parameter is placed with the sharding `rules` pick, reading only the
      slices each local device holds.
    rules: (regex on parameter path, PartitionSpec) pairs, see `metaphorstar_jax.sharding`.
    remat: rematerialise each block in the backward pass.
    remat_offload: with remat, keep each block's saved input in host memory.

  Returns:
    Qwen2_5_VL with the checkpoint's weights.
  """
  path = os.fspath(path)
  config = config_lib.from_json_file(path, dtype=jnp.dtype(dtype).name,
                                     param_dtype=jnp.dtype(param_dtype or dtype).name,
                                     remat=remat, remat_offload=remat_offload)
  graphdef, state = nnx.split(abstract_model(config))
  flat = dict(nnx.to_flat_state(state))
  table = name_table(config)
  reader = CheckpointReader(path)
  _check_tensors(reader, table, {p: v.shape for p, v in flat.items()}, config)
  entries_of = {}  # parameter path -> its tensors (a stacked parameter's in layer order)
  for entry in table:
    entries_of.setdefault(entry.path, []).append(entry)
  for path, entries in entries_of.items():
    variable = flat[path]
    shape, target_dtype = variable.shape, variable.dtype
    if mesh is None:
      value = jnp.asarray(_read_parameter(reader, entries, tuple(slice(None) for _ in shape),
                                          target_dtype))
    else:
      spec = sharding_lib.spec_for(sharding_lib.path_to_str(path), shape, mesh, rules)
      value = jax.make_array_from_callback(
          shape, NamedSharding(mesh, spec),
          lambda index, entries=entries, dt=target_dtype: _read_parameter(reader, entries, index,
                                                                          dt))
    variable.set_value(value)
  reader.close()
  return nnx.merge(graphdef, state)


def _to_hf(entry: Entry, value: np.ndarray, config) -> np.ndarray:
  if entry.kind == "linear":
    return np.ascontiguousarray(value.T)
  if entry.kind == "patch":
    return np.ascontiguousarray(value.T.reshape(_hf_shape(entry, value.shape, config)))
  return np.ascontiguousarray(value)


def _plan_shards(table, flat, max_shard_bytes: int) -> list[list[Entry]]:
  shards, current, size = [], [], 0
  for entry in table:
    variable = flat[entry.path]
    nbytes = int(np.prod(_tensor_shape(entry, variable.shape))) * variable.dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  return shards + [current] if current else shards


def _shard_names(count: int) -> Iterator[str]:
  if count == 1:
    yield SINGLE_FILE
    return
  for k in range(count):
    yield f"model-{k + 1:05d}-of-{count:05d}.safetensors"


def generation_config(config: config_lib.Qwen2_5_VLConfig) -> dict:
  """Stop on both <|im_end|> and <|endoftext|>, as the Instruct models do."""
  eos = config.eos_token_id
  stops = list(eos) if isinstance(eos, tuple) else [eos]
  pad = config.pad_token_id if config.pad_token_id is not None else config.bos_token_id
  if pad is not None and pad not in stops:
    stops.append(pad)
  return {"bos_token_id": config.bos_token_id, "eos_token_id": [s for s in stops if s is not None],
          "pad_token_id": pad, "do_sample": True, "temperature": 1.0, "top_p": 1.0}


def save_pretrained(model: Qwen2_5_VL, out_dir: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30, dtype=None,
                    copy_files_from: str | os.PathLike | None = None) -> None:
  """Writes `model` as an HF checkpoint directory that transformers' from_pretrained loads.

  Args:
    model: the NNX model (its parameters may be sharded, across hosts too).
    out_dir: created if needed; config.json, generation_config.json, safetensors shards and,
      when sharded, model.safetensors.index.json.
    max_shard_bytes: largest shard file.
    dtype: dtype on disk (default: the parameter dtype).
    copy_files_from: a checkpoint directory whose tokenizer and processor files are copied along.
  """
  out_dir = os.fspath(out_dir)
  config = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  table = name_table(config)
  disk_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  shards = _plan_shards(table, flat, max_shard_bytes)
  weight_map, total = {}, 0
  for file_name, shard in zip(_shard_names(len(shards)), shards):
    tensors = {}
    for entry in shard:
      # One layer's slice is gathered, not the whole stack per tensor; every host joins.
      value = sharding_lib.to_host(entry_value(entry, flat[entry.path].get_value()))
      if disk_dtype is not None:
        value = value.astype(disk_dtype)
      tensors[entry.hf_name] = _to_hf(entry, value, config)
      weight_map[entry.hf_name] = file_name
      total += tensors[entry.hf_name].nbytes
    if writer:
      save_file(tensors, os.path.join(out_dir, file_name), metadata={"format": "pt"})
  if not writer:
    return
  hf_config = config_lib.to_hf_dict(config)
  if disk_dtype is not None:
    hf_config["torch_dtype"] = jnp.dtype(disk_dtype).name
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(generation_config(config), f, indent=2)
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if copy_files_from is not None:
    for name in SIDE_FILES:
      source = os.path.join(os.fspath(copy_files_from), name)
      if os.path.exists(source):
        shutil.copy(source, os.path.join(out_dir, name))
