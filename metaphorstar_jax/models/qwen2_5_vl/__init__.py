"""Qwen2.5-VL in Flax NNX, numerically matching transformers, with HF weights both ways.

    from metaphorstar_jax.models import qwen2_5_vl
    model = qwen2_5_vl.from_pretrained("/ckpt/Qwen2.5-VL-7B-Instruct", dtype="bfloat16")
    logits = model(input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)
    qwen2_5_vl.save_pretrained(model, "/out/hf")
"""

from flax import nnx

from metaphorstar_jax.models.qwen2_5_vl.config import (PRESETS, Qwen2_5_VLConfig, TextConfig,
                                                       VisionConfig, from_hf_dict, from_json_file,
                                                       preset, to_hf_dict)
from metaphorstar_jax.models.qwen2_5_vl.hf_checkpoint import (CheckpointReader, abstract_model,
                                                              from_pretrained, name_table,
                                                              save_pretrained)
from metaphorstar_jax.models.qwen2_5_vl.model import Qwen2_5_VL, scatter_image_features
from metaphorstar_jax.models.qwen2_5_vl.positions import (VisionLayout, decode_positions,
                                                          rope_index, vision_layout)


def init(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VL:
  """A randomly initialised model (for tests, benchmarks and training from scratch)."""
  return Qwen2_5_VL(config, rngs=nnx.Rngs(seed))


__all__ = [
    "PRESETS", "CheckpointReader", "Qwen2_5_VL", "Qwen2_5_VLConfig", "TextConfig", "VisionConfig",
    "VisionLayout", "abstract_model", "decode_positions", "from_hf_dict", "from_json_file",
    "from_pretrained", "init", "name_table", "preset", "rope_index", "save_pretrained",
    "scatter_image_features", "to_hf_dict", "vision_layout",
]
