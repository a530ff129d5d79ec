"""HF export of training runs: the CLI on an 8-device checkpoint in a 1-device process, the
trainer's own exports, transformers reloading them with our logits, and what is never read."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw
from safetensors import safe_open

from hf_reference import hf_forward
from metaphorstar_jax import config_files, export, train
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.models.qwen2_5_vl import hf_checkpoint
from metaphorstar_jax.training import builders, checkpoints, hf_export

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("config_under_test", config_files.path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_run_config(workdir):
  """The default config's GRPO stage, scaled down to 2 steps, checkpointing and exporting at
  every step (with a KL reference, so the checkpoint holds params, optimizer and reference)."""
  config = load_config_file("tfq_grpo_tiny")
  config.workdir = str(workdir)
  config.log.progress_bar = config.log.tensorboard = config.log.plot = False
  config.train.prompts_per_step, config.rl.group_size, config.rl.max_new_tokens = 2, 2, 6
  config.eval.num_examples, config.eval.every = 2, 0
  config.data.task_options = dict(config.data.task_options, num_records=16)
  config.data.eval_task_options = dict(config.data.eval_task_options, num_records=4)
  config.stages = [config.stages[1]]
  config.stages[0].steps, config.stages[0].warmup_steps = 2, 0
  config.checkpoint.every, config.checkpoint.async_save = 1, False
  config.export.every, config.export.at_end = 1, True
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run trained on the 8-device test mesh: (config, results)."""
  assert jax.device_count() == 8, "conftest sets XLA_FLAGS for 8 simulated CPU devices"
  config = tiny_run_config(tmp_path_factory.mktemp("export") / "run")
  return config, train.train(config)


def export_cli(*args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "metaphorstar_jax.export", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def tensors(directory):
  index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
  out = {}
  for name, file in index["weight_map"].items():
    with safe_open(os.path.join(directory, file), framework="numpy") as f:
      out[name] = f.get_tensor(name)
  return out


def image_text_batch(processor):
  images = []
  for colour in ("red", "blue"):
    image = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(image).ellipse((20, 20, 90, 90), fill=colour)
    images.append(image)
  conversations = [[{"role": "user", "content": [
      {"type": "image", "image": image},
      {"type": "text", "text": "There is a red circle in the image."}]}] for image in images]
  return processor(conversations)


@pytest.mark.slow
def test_cli_export_of_an_eight_device_run_reloads_in_transformers_with_our_logits(run, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  config, results = run
  out = tmp_path / "latest"
  done = export_cli(f"--checkpoint={config.workdir}", f"--out={out}", devices=1)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout[done.stdout.index("{"):])
  assert summary["step"] == 2 and summary["tensors"] == len(qwen2_5_vl.name_table(
      qwen2_5_vl.preset("tiny")))
  assert {"config.json", "generation_config.json", "model.safetensors.index.json",
          "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
          "chat_template.jinja"} <= set(os.listdir(out))
  processor = builders.build_processor(config)
  batch = image_text_batch(processor)
  ours_model = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"))
  state = nnx.state(ours_model)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray,
                                               nnx.to_pure_dict(results["final_params"])))
  nnx.update(ours_model, state)
  ours = np.asarray(ours_model(batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"]))
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  theirs = hf_forward(hf, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                      batch["image_grid_thw"], image_token_id=ours_model.config.image_token_id)
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-5
  # The exported tokenizer is the run's: same ids for the same prompt.
  from metaphorstar_jax import data
  reread = data.ChatProcessor.from_pretrained(out)
  np.testing.assert_array_equal(image_text_batch(reread)["input_ids"], batch["input_ids"])
  # The trainer's end-of-run export holds the same tensors, bit for bit.
  at_end = tensors(hf_export.step_dir(config.workdir, 2))
  cli = tensors(out)
  assert at_end.keys() == cli.keys()
  for name in cli:
    np.testing.assert_array_equal(at_end[name], cli[name])


def test_step_flag_and_every_n_steps_exports_agree(run, tmp_path):
  config, results = run
  hf_root = os.path.join(config.workdir, "hf")
  # export.every=1: steps 1 and 2; at_end, right after step 2's, adds nothing.
  assert sorted(os.listdir(hf_root)) == ["step_1", "step_2"]
  assert results["exports"] == [hf_export.step_dir(config.workdir, s) for s in (1, 2)]
  summary = export.cli(["export", f"--checkpoint={config.workdir}", "--step=1",
                        f"--out={tmp_path / 'step1'}", "--dtype=bfloat16"])
  assert summary["step"] == 1
  written, trained = tensors(tmp_path / "step1"), tensors(os.path.join(hf_root, "step_1"))
  later = tensors(os.path.join(hf_root, "step_2"))
  name = "model.layers.0.mlp.up_proj.weight"
  assert written[name].dtype == np.dtype("bfloat16")
  for key in trained:
    np.testing.assert_array_equal(written[key], trained[key].astype("bfloat16"))
  assert not np.array_equal(trained[name], later[name])  # step 1 is not the last step
  assert json.load(open(tmp_path / "step1" / "config.json"))["torch_dtype"] == "bfloat16"


def test_optimizer_state_and_reference_are_never_read(run, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  config, _ = run
  read = []
  for handler in (ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler):
    original = handler.deserialize

    async def spy(self, infos, args=None, _original=original):
      read.extend(info.name for info in infos)
      return await _original(self, infos, args)
    monkeypatch.setattr(handler, "deserialize", spy)
  hf_export.export_checkpoint(config.workdir, str(tmp_path / "out"))
  saved = checkpoints.SavedArrays(os.path.join(config.workdir, "checkpoints"), 2).tree
  assert {"params", "opt_state", "ref_params"} <= set(saved)
  # Each parameter once: a stacked one's layers are all written from a single read.
  parameters = {entry.path for entry in qwen2_5_vl.name_table(qwen2_5_vl.preset("tiny"))}
  assert len(read) == len(set(read)) == len(parameters)
  assert all(name.startswith("params.") for name in read), [n for n in read
                                                             if not n.startswith("params.")]


def test_bad_input_is_a_clear_error_and_writes_nothing(run, tmp_path):
  config, _ = run
  out = tmp_path / "out"
  empty_run = tmp_path / "empty_run"
  (empty_run / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="No checkpoint under"):
    hf_export.export_checkpoint(str(empty_run), str(out))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_export.export_checkpoint(str(tmp_path / "missing"), str(out))
  with pytest.raises(ValueError, match=r"No checkpoint of step 7 .* saved steps: \[1, 2\]"):
    hf_export.export_checkpoint(config.workdir, str(out), step=7)
  assert not out.exists()
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not an empty folder"):
    hf_export.export_checkpoint(config.workdir, str(out))
  assert os.listdir(out) == ["notes.txt"]
  # A failure half-way through the tensors leaves neither the folder nor its scratch copy.
  model_config = qwen2_5_vl.preset("tiny")
  shapes = {path: v.shape for path, v in nnx.to_flat_state(
      nnx.state(qwen2_5_vl.abstract_model(model_config), nnx.Param))}
  calls = []

  def failing_read(entry):
    calls.append(entry)
    if len(calls) == 3:
      raise OSError("disk unplugged")
    return hf_checkpoint.entry_value(entry, np.zeros(shapes[entry.path], np.float32))
  with pytest.raises(OSError, match="disk unplugged"):
    hf_export.write_hf_checkpoint(str(tmp_path / "half"), model_config, failing_read,
                                  write_side_files=lambda folder: None)
  assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == ["empty_run", "out"]


def test_command_line_error_says_what_was_wrong(run, tmp_path, capsys):
  config, _ = run
  with pytest.raises(SystemExit) as exit_info:
    export.main(["export", f"--checkpoint={config.workdir}", "--step=7",
                 f"--out={tmp_path / 'x'}"])
  assert exit_info.value.code == 1
  assert "saved steps: [1, 2]" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
