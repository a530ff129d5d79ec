"""Config parsing (flat hub and nested 5.x layouts), presets, and errors."""

import json

import jax
import numpy as np
import pytest

from metaphorstar_jax.models import qwen2_5_vl

# The published Qwen2.5-VL-3B-Instruct config.json (flat hub layout), abridged to its used fields.
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def test_hub_config_matches_preset():
  assert qwen2_5_vl.from_hf_dict(HUB_3B) == qwen2_5_vl.preset("3b")


def test_nested_transformers5_config_parses_the_same(hf_tiny):
  hf_model, directory = hf_tiny("b")
  nested = hf_model.config.to_dict()
  assert "text_config" in nested and "rope_parameters" in nested["text_config"]
  cfg = qwen2_5_vl.from_hf_dict(nested)
  on_disk = qwen2_5_vl.from_json_file(directory)
  assert cfg == on_disk
  assert cfg.text.rms_norm_eps == 1e-5 and cfg.text.mrope_section == (4, 2, 2)
  assert cfg.vision.window_size == 56 and cfg.tie_word_embeddings
  # Our writer's flat config reads back to the same thing, and transformers accepts it.
  from transformers import Qwen2_5_VLConfig
  flat = qwen2_5_vl.to_hf_dict(cfg)
  assert qwen2_5_vl.from_hf_dict(json.loads(json.dumps(flat))) == cfg
  assert Qwen2_5_VLConfig(**flat).text_config.rms_norm_eps == 1e-5


def test_eps_and_tokens_per_second_come_from_the_file():
  changed = dict(HUB_3B, rms_norm_eps=1e-5)
  changed["vision_config"] = dict(HUB_3B["vision_config"], tokens_per_second=4,
                                  intermediate_size=3456)
  cfg = qwen2_5_vl.from_hf_dict(changed)
  assert cfg.text.rms_norm_eps == 1e-5
  assert cfg.vision.tokens_per_second == 4 and cfg.vision.intermediate_size == 3456


def test_missing_field_is_a_clear_error():
  broken = {k: v for k, v in HUB_3B.items() if k != "rms_norm_eps"}
  with pytest.raises(ValueError, match="rms_norm_eps"):
    qwen2_5_vl.from_hf_dict(broken)


def test_inconsistent_config_is_a_clear_error():
  with pytest.raises(ValueError, match="mrope_section"):
    qwen2_5_vl.from_hf_dict(dict(HUB_3B, rope_scaling={"type": "mrope",
                                                       "mrope_section": [16, 24, 16]}))


# Parameter totals of the released models (transformers meta-device counts, spec §1.1).
RELEASED_TOTALS = {"3b": 3.755e9, "7b": 8.292e9, "32b": 33.453e9, "72b": 73.411e9}


@pytest.mark.parametrize("name", sorted(RELEASED_TOTALS))
def test_presets_have_the_released_parameter_counts(name):
  model = qwen2_5_vl.abstract_model(qwen2_5_vl.preset(name))
  from flax import nnx
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(total - RELEASED_TOTALS[name]) / RELEASED_TOTALS[name] < 5e-4
  assert len(qwen2_5_vl.name_table(model.config)) == {"3b": 824, "7b": 729, "32b": 1161,
                                                      "72b": 1353}[name]


@pytest.mark.parametrize("name,total", [("tiny", 1.18e6), ("small", 30.7e6)])
def test_bench_presets_match_the_bench_spec(name, total):
  from flax import nnx
  cfg = qwen2_5_vl.preset(name)
  assert cfg.image_token_id == 2012 and cfg.eos_token_id == 2002 and cfg.text.vocab_size == 2048
  model = qwen2_5_vl.abstract_model(cfg)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(count - total) / total < 5e-3
