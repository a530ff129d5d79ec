"""training/builders.py: the processor the config names, a seeded policy laid out by the mesh
rules, a tokenizer that must fit the model, evaluation data under its own options and limit (never
the training records), and a stage's optimizer at the stage's rate with the vision tower frozen
when asked."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metaphorstar_jax import config_defaults, sharding
from metaphorstar_jax.training import builders
from helpers import smoke_default_config


def test_the_processor_follows_the_config():
  config = config_defaults.base_config()
  config.model.tokenizer = "small"
  config.image.min_pixels, config.image.max_pixels = 56 * 56, 112 * 112
  processor = builders.build_processor(config)
  assert processor.tokenizer.get_vocab_size(with_added_tokens=True) < 2100  # the small one
  images = processor.image_processor
  assert (images.min_pixels, images.max_pixels) == (56 * 56, 112 * 112)


def test_a_preset_model_is_seeded_and_laid_out_by_the_mesh_rules(tmp_path):
  config = smoke_default_config(tmp_path)
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  weights = lambda seed: nnx.state(builders.build_model(config, mesh))
  first = weights(config.seed)
  jax.tree.map(np.testing.assert_array_equal, first, weights(config.seed))  # same seed, same
  config.seed += 1
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), first,
                                              weights(config.seed))))
  wanted = sharding.parameter_shardings(first, mesh)
  jax.tree.map(lambda array, sharding_: (array.sharding == sharding_) or pytest.fail(
      f"{array.sharding} != {sharding_}"), first, wanted)


def test_run_model_config_is_the_preset_or_the_checkpoints_and_says_when_that_is_missing(
    tmp_path):
  config = config_defaults.base_config()
  config.model.param_dtype = "bfloat16"
  model_config = builders.run_model_config(config)
  assert model_config.text.vocab_size > 0 and not model_config.remat  # evaluation never remats
  config.model.hf_path = str(tmp_path / "gone")
  with pytest.raises(FileNotFoundError, match="no config.json on this machine"):
    builders.run_model_config(config)


def fake_model(vocab_size, image_token_id):
  return types.SimpleNamespace(config=types.SimpleNamespace(
      text=types.SimpleNamespace(vocab_size=vocab_size), image_token_id=image_token_id))


def test_a_tokenizer_that_does_not_fit_the_model_is_refused():
  config = config_defaults.base_config()
  config.model.tokenizer = "small"
  processor = builders.build_processor(config)
  vocab = processor.tokenizer.get_vocab_size(with_added_tokens=True)
  image_pad = processor.special_tokens.image_pad
  builders.check_vocabulary(fake_model(vocab, image_pad), processor)  # fits exactly
  with pytest.raises(ValueError, match=f"{vocab} tokens but the model embeds only {vocab - 1}"):
    builders.check_vocabulary(fake_model(vocab - 1, image_pad), processor)
  with pytest.raises(ValueError, match=f"<\\|image_pad\\|> is {image_pad} but the model expects"):
    builders.check_vocabulary(fake_model(vocab, image_pad + 1), processor)


def test_evaluation_uses_its_own_task_options_records_and_limit(tmp_path):
  config = smoke_default_config(tmp_path)
  config.data.task_options = {"num_records": 12, "image_size": 56}
  config.data.eval_task_options = {"num_records": 9, "image_size": 56, "seed": 1}
  config.eval.num_examples = 5
  task, train_records, eval_records = builders.load_data(config)
  assert builders.eval_task(config).options.num_records == 9
  assert len(train_records) == 12 and len(eval_records) == 5
  config.data.eval_task_options = {}  # unset: the training task's options
  config.eval.num_examples = 0  # all
  assert builders.eval_task(config).options.num_records == 12
  eval_records = builders.eval_records(config, builders.eval_task(config), str(tmp_path))[0]
  assert len(eval_records) == 12


def test_generated_evaluation_records_that_are_training_records_are_refused(tmp_path):
  config = smoke_default_config(tmp_path)
  config.data.task_options = {"num_records": 12, "image_size": 56}
  config.data.eval_task_options = {"num_records": 9, "image_size": 56}  # the same seed, 0
  config.eval.num_examples = 4
  with pytest.raises(ValueError, match=r"4 of the 4 evaluation records are training records.*"
                                       r"eval_task_options.seed"):
    builders.load_data(config)


def test_a_stages_optimizer_takes_its_rate_and_leaves_a_frozen_vision_tower_alone():
  config = config_defaults.base_config()
  config.model.freeze_vision = True
  config.optim.weight_decay = 0.0
  stage = config_defaults.stage("grpo", kind="grpo", steps=5, learning_rate=0.1)
  params = {"visual": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
  tx = builders.stage_optimizer(config, stage, params)
  grads = {"visual": {"w": jnp.full(3, 0.5)}, "text": {"w": jnp.full(3, 0.5)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(moved["visual"]["w"], params["visual"]["w"])
  # Adam's first step moves each weight by the learning rate against its gradient's sign.
  np.testing.assert_allclose(moved["text"]["w"], 1.0 - 0.1, rtol=1e-5)
  assert builders.frozen_patterns(config) == (r"^visual/",)
  config.model.freeze_vision = False
  assert builders.frozen_patterns(config) == ()
