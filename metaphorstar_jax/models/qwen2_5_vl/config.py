"""Qwen2.5-VL configuration: read from an HF `config.json`, written back to one, and named presets.

Every architectural number comes from the checkpoint's own config. The transformers class defaults
differ from the released models (eps 1e-5, tokens_per_second 4, vision width 3584), so nothing here
falls back on them for a field a real config carries.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The window-attention ViT and patch merger."""

  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  fullatt_block_indexes: tuple[int, ...]
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  in_channels: int = 3
  tokens_per_second: float = 2
  hidden_act: str = "silu"
  # Fixed by the architecture (not in hub configs): vision RMSNorm eps and axial rope base.
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch row of `pixel_values`: C·Tp·P·P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with M-RoPE."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float
  rope_theta: float
  mrope_section: tuple[int, ...]
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """The whole model plus the numerics we run it with (dtypes, remat) that no HF file holds."""

  text: TextConfig
  vision: VisionConfig
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  # Run-time choices, not architecture.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # With remat, each layer's saved input (what its recomputation starts from) waits for the
  # backward pass in host memory instead of the accelerator's.
  remat_offload: bool = False

  def __post_init__(self):
    text, vision = self.text, self.vision
    problems = []
    if self.remat_offload and not self.remat:
      problems.append("remat_offload keeps rematerialised layers' inputs in host memory; it "
                      "needs remat=True")
    if text.hidden_size % text.num_attention_heads:
      problems.append(f"text hidden_size {text.hidden_size} is not divisible by "
                      f"num_attention_heads {text.num_attention_heads}")
    elif 2 * sum(text.mrope_section) != text.head_dim:
      problems.append(f"mrope_section {list(text.mrope_section)} must sum to head_dim/2 = "
                      f"{text.head_dim // 2}")
    if text.num_attention_heads % text.num_key_value_heads:
      problems.append(f"num_attention_heads {text.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {text.num_key_value_heads}")
    if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
      problems.append(f"vision head_dim {vision.hidden_size}/{vision.num_heads} must be an integer "
                      "divisible by 4 (the axial rope splits half of it into rows and columns)")
    if vision.out_hidden_size != text.hidden_size:
      problems.append(f"vision out_hidden_size {vision.out_hidden_size} must equal text "
                      f"hidden_size {text.hidden_size}")
    bad_blocks = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.depth]
    if bad_blocks:
      problems.append(f"fullatt_block_indexes {bad_blocks} fall outside depth {vision.depth}")
    if vision.window_size % (vision.spatial_merge_size * vision.patch_size):
      problems.append(f"window_size {vision.window_size} is not a multiple of "
                      f"spatial_merge_size*patch_size")
    if problems:
      raise ValueError("Invalid Qwen2.5-VL config: " + "; ".join(problems) + ".")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weights_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "Qwen2_5_VLConfig":
    return dataclasses.replace(self, **changes)


_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)}
_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)}
_TOP_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id")


def _require(section: dict[str, Any], name: str, where: str) -> Any:
  if name not in section:
    raise ValueError(f"HF config is missing '{name}' in {where}; it has {sorted(section)}. "
                     "Pass a complete Qwen2.5-VL config.json.")
  return section[name]


def _rope_of(text: dict[str, Any]) -> tuple[float, tuple[int, ...]]:
  """rope_theta and mrope_section from either `rope_parameters` (5.x) or `rope_scaling` (hub)."""
  rope = text.get("rope_parameters") or {}
  scaling = text.get("rope_scaling") or {}
  theta = rope.get("rope_theta", text.get("rope_theta"))
  section = rope.get("mrope_section", scaling.get("mrope_section"))
  if theta is None:
    raise ValueError("HF config has no rope_theta (top level or in rope_parameters).")
  if section is None:
    raise ValueError("HF config has no mrope_section (in rope_scaling or rope_parameters); "
                     "Qwen2.5-VL checkpoints always carry it.")
  return float(theta), tuple(int(s) for s in section)


def from_hf_dict(hf: dict[str, Any], **runtime) -> Qwen2_5_VLConfig:
  """Builds a config from a parsed HF `config.json`, flat (hub) or nested (transformers 5.x).

  `runtime` sets the run-time fields (dtype, param_dtype, remat, remat_offload).
  """
  text = dict(hf.get("text_config") or hf)  # flat hub layout keeps text fields at the top
  vision_in = _require(hf, "vision_config", "the top level")
  theta, section = _rope_of(text)
  text_cfg = TextConfig(
      vocab_size=_require(text, "vocab_size", "text config"),
      hidden_size=_require(text, "hidden_size", "text config"),
      intermediate_size=_require(text, "intermediate_size", "text config"),
      num_hidden_layers=_require(text, "num_hidden_layers", "text config"),
      num_attention_heads=_require(text, "num_attention_heads", "text config"),
      num_key_value_heads=_require(text, "num_key_value_heads", "text config"),
      rms_norm_eps=float(_require(text, "rms_norm_eps", "text config")),
      rope_theta=theta,
      mrope_section=section,
      max_position_embeddings=text.get("max_position_embeddings", 128000),
      hidden_act=text.get("hidden_act", "silu"),
  )
  vision = {k: v for k, v in vision_in.items() if k in _VISION_FIELDS}
  if "in_channels" not in vision and "in_chans" in vision_in:
    vision["in_channels"] = vision_in["in_chans"]
  for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
               "fullatt_block_indexes", "tokens_per_second"):
    _require(vision_in, name, "vision_config")
  vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
  vision.pop("rope_theta", None)
  top = {k: hf[k] for k in _TOP_FIELDS if k in hf}
  eos = text.get("eos_token_id", hf.get("eos_token_id"))
  return Qwen2_5_VLConfig(
      text=text_cfg,
      vision=VisionConfig(**vision),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
      bos_token_id=text.get("bos_token_id", hf.get("bos_token_id")),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=text.get("pad_token_id", hf.get("pad_token_id")),
      **top,
      **runtime,
  )


def to_hf_dict(config: Qwen2_5_VLConfig) -> dict[str, Any]:
  """The config as a flat hub-style `config.json` that transformers 4.49+ and 5.x both read."""
  text, vision = config.text, config.vision
  eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "vocab_size": text.vocab_size,
      "hidden_size": text.hidden_size,
      "intermediate_size": text.intermediate_size,
      "num_hidden_layers": text.num_hidden_layers,
      "num_attention_heads": text.num_attention_heads,
      "num_key_value_heads": text.num_key_value_heads,
      "hidden_act": text.hidden_act,
      "max_position_embeddings": text.max_position_embeddings,
      "rms_norm_eps": text.rms_norm_eps,
      "rope_theta": text.rope_theta,
      "rope_scaling": {"type": "mrope", "mrope_section": list(text.mrope_section)},
      "use_sliding_window": False,
      "attention_dropout": 0.0,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": eos,
      "pad_token_id": config.pad_token_id,
      "torch_dtype": config.param_dtype,
      **{k: getattr(config, k) for k in _TOP_FIELDS},
      "vision_config": {
          "depth": vision.depth,
          "hidden_size": vision.hidden_size,
          "intermediate_size": vision.intermediate_size,
          "num_heads": vision.num_heads,
          "out_hidden_size": vision.out_hidden_size,
          "fullatt_block_indexes": list(vision.fullatt_block_indexes),
          "patch_size": vision.patch_size,
          "temporal_patch_size": vision.temporal_patch_size,
          "spatial_merge_size": vision.spatial_merge_size,
          "window_size": vision.window_size,
          "in_channels": vision.in_channels,
          "tokens_per_second": vision.tokens_per_second,
          "hidden_act": vision.hidden_act,
      },
  }


def from_json_file(path: str | os.PathLike, **runtime) -> Qwen2_5_VLConfig:
  """Reads `config.json` (a file path, or a checkpoint directory containing one)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No Qwen2.5-VL config at {path}: expected an HF checkpoint directory "
                            "with config.json.")
  with open(path) as f:
    return from_hf_dict(json.load(f), **runtime)


def _released(hidden, layers, heads, kv_heads, intermediate, vocab, tied, vision_intermediate,
              **runtime) -> Qwen2_5_VLConfig:
  return Qwen2_5_VLConfig(
      text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                      mrope_section=(16, 24, 24)),
      vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=vision_intermediate,
                          num_heads=16, out_hidden_size=hidden,
                          fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2),
      tie_word_embeddings=tied,
      **runtime,
  )


# The released Instruct sizes (spec §1.1). A checkpoint's own config.json always wins over these.
PRESETS = {
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936,
               tied=True, vision_intermediate=3420),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
               tied=False, vision_intermediate=3420),
    "32b": dict(hidden=5120, layers=64, heads=40, kv_heads=8, intermediate=27648, vocab=152064,
                tied=False, vision_intermediate=3456),
    "72b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568, vocab=152064,
                tied=False, vision_intermediate=3456),
}


# Random-weight sizes for tests, benchmarks and the CPU default (shared/specs/bench_models.md):
# a 2048-token vocabulary whose Qwen special tokens sit at 2000 + k instead of 151643 + k.
SMALL_VOCAB_SIZES = {
    "tiny": dict(text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=384, mrope_section=(4, 6, 6)),
                 vision=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                             fullatt_block_indexes=(1,))),
    "small": dict(text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=1536,
                            mrope_section=(8, 12, 12)),
                  vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512,
                              fullatt_block_indexes=(1, 3))),
}
SMALL_VOCAB = 2048
SMALL_VOCAB_FIRST_SPECIAL = 2000  # <|endoftext|>; Qwen's 151643


def _small_vocab(text, vision, **runtime) -> Qwen2_5_VLConfig:
  special = lambda qwen_id: SMALL_VOCAB_FIRST_SPECIAL + qwen_id - 151643
  return Qwen2_5_VLConfig(
      text=TextConfig(vocab_size=SMALL_VOCAB, rms_norm_eps=1e-6, rope_theta=1e6, **text),
      vision=VisionConfig(out_hidden_size=text["hidden_size"], tokens_per_second=2, **vision),
      tie_word_embeddings=False,
      image_token_id=special(151655), video_token_id=special(151656),
      vision_start_token_id=special(151652), vision_end_token_id=special(151653),
      bos_token_id=special(151643), eos_token_id=special(151645), pad_token_id=special(151643),
      **runtime)


def preset(name: str, **runtime) -> Qwen2_5_VLConfig:
  """A released size ('3b', '7b', '32b', '72b') or a random-weight size ('tiny', 'small')."""
  key = name.lower().removeprefix("qwen2.5-vl-").removesuffix("-instruct")
  if key in SMALL_VOCAB_SIZES:
    return _small_vocab(**SMALL_VOCAB_SIZES[key], **runtime)
  if key not in PRESETS:
    raise ValueError(f"Unknown Qwen2.5-VL preset {name!r}; choose one of "
                     f"{sorted(PRESETS) + sorted(SMALL_VOCAB_SIZES)}.")
  return _released(**PRESETS[key], **runtime)
