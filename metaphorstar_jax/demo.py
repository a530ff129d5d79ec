"""End-to-end smoke run of the model stack on CPU: processor → Qwen2.5-VL → logits → HF export.

    python -m metaphorstar_jax.demo                       # tiny random model, synthetic image
    python -m metaphorstar_jax.demo --hf_path=/ckpt/Qwen2.5-VL-3B-Instruct --image=cat.png

With no checkpoint it builds the 'tiny' random model and the package's small tokenizer, draws an
image of coloured shapes, asks a true/false question about it, prints what the model computed,
exports the weights as an HF checkpoint and reloads them to show the round trip is exact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from PIL import Image

from metaphorstar_jax import data
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.tasks import shape_scenes

_HF_PATH = flags.DEFINE_string("hf_path", None, "Local HF Qwen2.5-VL checkpoint directory; "
                               "default: a tiny random model.")
_PRESET = flags.DEFINE_string("preset", "tiny", "Random-weight size when no checkpoint is given.")
_IMAGE = flags.DEFINE_string("image", None, "An image file; default: a drawn synthetic image.")
_PROMPT = flags.DEFINE_string("prompt", "Is the red circle left of the blue square? Answer "
                              "True or False.", "The user's question about the image.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 8, "Greedy tokens to decode.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")


def load(hf_path: str | None):
  if hf_path:
    return qwen2_5_vl.from_pretrained(hf_path), data.ChatProcessor.from_pretrained(hf_path)
  processor = data.ChatProcessor.from_tokenizer(
      data.build_small_tokenizer(), data.ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112))
  return qwen2_5_vl.init(qwen2_5_vl.preset(_PRESET.value), seed=_SEED.value), processor


def greedy_decode(model, batch, steps: int) -> list[int]:
  """Greedy tokens by re-running the full jitted forward (no KV cache: a demo, not the sampler).

  The prompt is right-extended with `steps` masked slots so every step reuses one compiled program;
  causal attention keeps the empty slots from touching earlier positions.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_at(state, ids, mask, pixels, grids, index):
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pixels,
                                         image_grid_thw=grids)
    return jnp.argmax(logits[0, index])

  prompt_len = batch["input_ids"].shape[1]
  ids = np.pad(batch["input_ids"], ((0, 0), (0, steps)))
  mask = np.pad(batch["attention_mask"], ((0, 0), (0, steps)))
  for step in range(steps):
    index = prompt_len + step - 1
    ids[0, index + 1] = int(logits_at(state, ids, mask, batch["pixel_values"],
                                      batch["image_grid_thw"], index))
    mask[0, index + 1] = 1
  return ids[0, prompt_len:].tolist()


def main(argv):
  del argv
  start = time.perf_counter()
  model, processor = load(_HF_PATH.value)
  image = Image.open(_IMAGE.value) if _IMAGE.value else shape_scenes.example_image()
  conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": _PROMPT.value}]}]
  batch = processor([conversation])
  logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  positions, deltas = model.position_ids(batch["input_ids"], batch["attention_mask"],
                                         batch["image_grid_thw"])
  top = np.argsort(-np.asarray(logits[0, -1]))[:5]
  generated = greedy_decode(model, batch, _NEW_TOKENS.value)

  with tempfile.TemporaryDirectory() as export_dir:
    qwen2_5_vl.save_pretrained(model, export_dir)
    processor.save_pretrained(export_dir)
    reloaded = qwen2_5_vl.from_pretrained(export_dir)
    again = reloaded(batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    round_trip_error = float(jnp.abs(again - logits).max())
    exported = sorted(os.listdir(export_dir))

  config = model.config
  report = {
      "model": _HF_PATH.value or f"random '{_PRESET.value}'",
      "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
      "prompt_tokens": int(batch["input_ids"].shape[1]),
      "image_grid_thw": batch["image_grid_thw"].tolist(),
      "image_tokens": int((batch["input_ids"] == config.image_token_id).sum()),
      "pixel_values_shape": list(batch["pixel_values"].shape),
      "logits_shape": list(logits.shape),
      "max_position": int(positions.max()),
      "rope_delta": int(deltas[0]),
      "top5_next_tokens": [processor.decode([int(t)]) for t in top],
      "greedy_continuation": processor.decode(generated),
      "hf_export_files": exported,
      "hf_round_trip_max_abs_logit_diff": round_trip_error,
      "seconds": round(time.perf_counter() - start, 2),
  }
  logging.info("Prompt: %s", processor.decode(batch["input_ids"][0].tolist()).replace(
      "<|image_pad|>", "")[:300])
  print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
