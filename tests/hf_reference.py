"""Tiny random transformers Qwen2.5-VL models and inputs for parity tests (PyTorch, CPU, no hub)."""

from __future__ import annotations

import numpy as np

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653

# Two tiny architectures that differ in every knob the port must honour.
TINY_CONFIGS = {
    "a": dict(
        text=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                   "mrope_section": [2, 3, 3]}),
        vision=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2,
                    out_hidden_size=64, window_size=112, fullatt_block_indexes=[1, 3]),
        tie_word_embeddings=False),
    "b": dict(
        text=dict(vocab_size=151700, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, rms_norm_eps=1e-5,
                  max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                   "mrope_section": [4, 2, 2]}),
        vision=dict(depth=3, hidden_size=48, intermediate_size=64, num_heads=3,
                    out_hidden_size=96, window_size=56, fullatt_block_indexes=[0]),
        tie_word_embeddings=True),
}


def build_hf_model(name: str, seed: int = 0):
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  spec = TINY_CONFIGS[name]
  cfg = Qwen2_5_VLConfig(
      text_config=dict(spec["text"]),
      vision_config=dict(spec["vision"], patch_size=14, temporal_patch_size=2,
                         spatial_merge_size=2, tokens_per_second=2, in_channels=3),
      image_token_id=IMAGE_PAD, video_token_id=151656, vision_start_token_id=VISION_START,
      vision_end_token_id=VISION_END, tie_word_embeddings=spec["tie_word_embeddings"])
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  # Random init leaves norms at one and biases at zero; perturb them so their mapping is tested.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith(".bias") or "norm" in pname or "ln_q" in pname:
        p.add_(0.1 * torch.randn_like(p))
  return model


def sample_ids(rng: np.random.Generator, segments) -> list[int]:
  """segments: ints (that many random text tokens) and ('image', n) for an expanded image."""
  ids = []
  for seg in segments:
    if isinstance(seg, tuple):
      ids += [VISION_START] + [IMAGE_PAD] * seg[1] + [VISION_END]
    else:
      ids += rng.integers(0, 151000, size=seg).tolist()
  return ids


def random_pixels(rng: np.random.Generator, grids) -> np.ndarray:
  patches = sum(int(np.prod(g)) for g in grids)
  return rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32)


def hf_forward(model, input_ids, attention_mask, pixel_values=None, grids=None,
               image_token_id=IMAGE_PAD):
  """Logits from transformers (5.x needs mm_token_type_ids to take the M-RoPE path)."""
  import torch
  ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
  kwargs = dict(input_ids=ids, attention_mask=torch.tensor(np.asarray(attention_mask)),
                mm_token_type_ids=(ids == image_token_id).int())
  if pixel_values is not None:
    kwargs.update(pixel_values=torch.tensor(pixel_values),
                  image_grid_thw=torch.tensor(np.asarray(grids), dtype=torch.long))
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()
