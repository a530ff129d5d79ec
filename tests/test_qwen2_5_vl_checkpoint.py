"""HF interchange: load, save, reload in transformers; sharded files; 5.x names; bf16; meshes."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_reference import hf_forward, random_pixels, sample_ids
from metaphorstar_jax import sharding
from metaphorstar_jax.models import qwen2_5_vl


def image_batch(seed=0):
  rng = np.random.default_rng(seed)
  grids = [[1, 8, 12], [1, 6, 6]]
  rows = [sample_ids(rng, [5, ("image", 24), 6]), sample_ids(rng, [3, ("image", 9), 20])]
  T = max(map(len, rows))
  ids = np.zeros((2, T), np.int64)
  mask = np.zeros((2, T), np.int64)
  for b, row in enumerate(rows):
    ids[b, T - len(row):], mask[b, T - len(row):] = row, 1
  return ids, mask, random_pixels(rng, grids), np.asarray(grids)


def our_logits(model, ids, mask, pixels, grids):
  return np.asarray(model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids))


@pytest.mark.parametrize("name", ["a", "b"])
def test_round_trip_through_transformers(hf_tiny, tmp_path, name):
  from transformers import Qwen2_5_VLForConditionalGeneration
  hf_model, hf_dir = hf_tiny(name)
  ids, mask, pixels, grids = image_batch()
  model = qwen2_5_vl.from_pretrained(hf_dir)
  qwen2_5_vl.save_pretrained(model, tmp_path / "export")
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
  ref = hf_forward(hf_model, ids, mask, pixels, grids)
  again = hf_forward(reloaded, ids, mask, pixels, grids)
  valid = mask.astype(bool)
  assert np.abs(ref[valid] - again[valid]).max() == 0.0
  assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
  generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
  assert set(generation["eos_token_id"]) == {151645, 151643}


def test_sharded_checkpoint_loads_like_single_file(hf_tiny, tmp_path):
  _, hf_dir = hf_tiny("a")
  model = qwen2_5_vl.from_pretrained(hf_dir)
  qwen2_5_vl.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=2**20)
  files = sorted(os.listdir(tmp_path / "sharded"))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 1 and "model.safetensors.index.json" in files
  resharded = qwen2_5_vl.from_pretrained(tmp_path / "sharded")
  ids, mask, pixels, grids = image_batch(1)
  np.testing.assert_array_equal(our_logits(model, ids, mask, pixels, grids),
                                our_logits(resharded, ids, mask, pixels, grids))
  # transformers reads the sharded export too.
  from transformers import Qwen2_5_VLForConditionalGeneration
  Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "sharded")


def test_modern_key_names_and_bf16_on_disk(hf_tiny, tmp_path):
  _, hf_dir = hf_tiny("a")
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  renamed = {}
  for key, value in tensors.items():
    key = "model.visual." + key[len("visual."):] if key.startswith("visual.") else key
    key = "model.language_model." + key[len("model."):] if key.startswith("model.layers") or \
        key.startswith("model.embed_tokens") or key.startswith("model.norm") else key
    renamed[key] = torch.tensor(value).bfloat16()
  out = tmp_path / "modern"
  out.mkdir()
  from safetensors.torch import save_file as save_torch
  save_torch(renamed, out / "model.safetensors")
  (out / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  model = qwen2_5_vl.from_pretrained(out)
  kernel = model.language_model.layers.self_attn.q_proj.kernel[...][0]
  expected = torch.tensor(tensors["model.layers.0.self_attn.q_proj.weight"]).bfloat16().float().T
  np.testing.assert_array_equal(np.asarray(kernel), expected.numpy())


def test_missing_tensor_is_a_clear_error(hf_tiny, tmp_path):
  _, hf_dir = hf_tiny("a")
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  out = tmp_path / "broken"
  out.mkdir()
  save_file(tensors, out / "model.safetensors")
  (out / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
    qwen2_5_vl.from_pretrained(out)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    qwen2_5_vl.from_pretrained(tmp_path)


def test_bfloat16_compute_stays_close(hf_tiny):
  _, hf_dir = hf_tiny("a")
  ids, mask, pixels, grids = image_batch(2)
  ref = our_logits(qwen2_5_vl.from_pretrained(hf_dir), ids, mask, pixels, grids)
  half = qwen2_5_vl.from_pretrained(hf_dir, dtype="bfloat16")
  assert half.language_model.layers.mlp.up_proj.kernel[...].dtype == np.dtype("bfloat16")
  got = our_logits(half, ids, mask, pixels, grids).astype(np.float32)
  valid = mask.astype(bool)
  assert np.abs(ref[valid] - got[valid]).max() < 0.1 * np.abs(ref[valid]).max()


@pytest.mark.parametrize("name", ["a", "b"])
def test_fsdp_sharded_load_gives_same_logits(hf_tiny, name):
  assert jax.device_count() == 8, "conftest sets XLA_FLAGS for 8 simulated CPU devices"
  _, hf_dir = hf_tiny(name)
  mesh = sharding.make_mesh(fsdp=8)
  sharded = qwen2_5_vl.from_pretrained(hf_dir, mesh=mesh)
  q_kernel = sharded.language_model.layers.self_attn.q_proj.kernel[...]  # (L, in, out)
  assert q_kernel.sharding.spec[:2] == (None, "fsdp")  # the stacked layer axis stays whole
  assert len({s.device for s in q_kernel.addressable_shards}) == 8
  assert q_kernel.addressable_shards[0].data.shape[:2] == (q_kernel.shape[0],
                                                           q_kernel.shape[1] // 8)
  ids, mask, pixels, grids = image_batch(3)
  single = qwen2_5_vl.from_pretrained(hf_dir)
  np.testing.assert_allclose(our_logits(sharded, ids, mask, pixels, grids),
                             our_logits(single, ids, mask, pixels, grids), atol=1e-5)


def test_tensor_and_fsdp_mesh_load(hf_tiny):
  _, hf_dir = hf_tiny("a")
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  model = qwen2_5_vl.from_pretrained(hf_dir, mesh=mesh)
  assert model.lm_head.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ids, mask, pixels, grids = image_batch(4)
  np.testing.assert_allclose(our_logits(model, ids, mask, pixels, grids),
                             our_logits(qwen2_5_vl.from_pretrained(hf_dir), ids, mask, pixels,
                                        grids), atol=1e-5)


def test_mesh_that_does_not_fit_is_a_clear_error():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(data=2, fsdp=4, tensor=2)


def test_mesh_load_reads_only_each_devices_slice(hf_tiny, monkeypatch):
  """With a mesh, no tensor is read whole: each device's callback reads its own shard."""
  _, hf_dir = hf_tiny("a")
  reads = []
  original = qwen2_5_vl.CheckpointReader.read

  def spy(self, name, index=None):
    block = original(self, name, index)
    reads.append((name, block.shape))
    return block

  monkeypatch.setattr(qwen2_5_vl.CheckpointReader, "read", spy)
  qwen2_5_vl.from_pretrained(hf_dir, mesh=sharding.make_mesh(fsdp=8))
  embed = [shape for name, shape in reads if name == "model.embed_tokens.weight"]
  assert embed and all(shape == (151936, 64 // 8) for shape in embed)
  q_proj = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert q_proj and all(shape == (64, 64 // 8) for shape in q_proj)
