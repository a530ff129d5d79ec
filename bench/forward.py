"""Forward-pass throughput: our jitted Qwen2.5-VL against transformers' PyTorch forward.

Both run the same random benchmark model (weights saved by transformers, loaded by us) on the same
left-padded batch of one-image true/false prompts, fp32 on CPU, in one process, timed in turns.
Prints one JSON line on stdout; logs go to stderr. Run it on an otherwise idle machine: with a
core busy elsewhere, torch's 2-thread OpenMP forward slows down several-fold and ours far less.

    python bench/forward.py                      # small model, batch 8, 10 repeats
    python -m bench.forward --model tiny --batch 2 --repeats 1

Shape letters (README "Shape letters"): B rows, T tokens, V vocabulary, X patch rows, Y values per
patch row, I images.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` and `metaphorstar_jax` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "small", ["tiny", "small"], "Benchmark model size (bench_models.md).")
flags.DEFINE_integer("batch", 8, "Prompts per batch, one 112x112 image each.")
flags.DEFINE_integer("repeats", 10, "Timed forward passes per side; the median is reported.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads for the PyTorch side.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and the synthetic prompts.")


def jitted_forward(graphdef):
  """jit of (state, inputs) -> logits (B, T, V); weights are arguments: updates never recompile."""
  import jax
  from flax import nnx

  @jax.jit
  def forward(state, input_ids_BT, attention_mask_BT, pixel_values_XY, image_grid_thw_I3):
    model = nnx.merge(graphdef, state)
    return model(input_ids_BT, attention_mask=attention_mask_BT, pixel_values=pixel_values_XY,
                 image_grid_thw=image_grid_thw_I3)

  return forward


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.batch < 1 or FLAGS.repeats < 1 or FLAGS.threads < 1:
    raise app.UsageError(f"--batch, --repeats and --threads must be positive, got "
                         f"{FLAGS.batch}, {FLAGS.repeats}, {FLAGS.threads}.")
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from bench import common

  torch.set_num_threads(FLAGS.threads)
  logging.info("Building the %s model (seed %d) and loading it on both sides.", FLAGS.model,
               FLAGS.seed)
  hf_model, model = common.load_model_pair(FLAGS.model, FLAGS.seed)
  inputs = common.synthetic_batch(FLAGS.batch, FLAGS.seed)
  B, T = inputs["input_ids"].shape
  image_tokens_B = (inputs["input_ids"] == common.SPECIAL_IDS["image_token_id"]).sum(axis=1)
  logging.info("Batch: B=%d, T=%d, %d patch rows, image tokens per sample %s.", B, T,
               inputs["pixel_values"].shape[0], sorted(set(image_tokens_B.tolist())))

  # Ours: weights and inputs on device first, compile outside the timed region.
  graphdef, state = nnx.split(model)
  args = jax.device_put((state, inputs["input_ids"], inputs["attention_mask"],
                         inputs["pixel_values"], inputs["image_grid_thw"]))
  forward = jitted_forward(graphdef)
  start = time.perf_counter()
  compiled = forward.lower(*args).compile()
  compile_s = time.perf_counter() - start
  logging.info("Compiled our forward in %.2f s.", compile_s)
  ours_logits_BTV = np.asarray(compiled(*args).block_until_ready())  # warm-up

  # transformers: eager fp32, no grad, same inputs; warmed up once too.
  torch_kwargs = common.torch_inputs(inputs)
  with torch.no_grad(), common.OtherLoad() as other_load:
    torch_logits_BTV = hf_model(**torch_kwargs).logits.float().numpy()
    ours_s, torch_s = common.interleaved_medians(
        [lambda: compiled(*args).block_until_ready(), lambda: hf_model(**torch_kwargs)],
        FLAGS.repeats)
  # Other processes skew the figures badly here: torch's OpenMP threads stall when a core is busy.
  if other_load.share is not None and other_load.share > 0.1:
    logging.warning("Other processes used %.0f%% of the CPUs while timing; the figures, torch's "
                    "above all, are not reliable. Rerun on an idle machine.",
                    100 * other_load.share)
  logging.info("Median over %d runs: ours %.1f ms, PyTorch %.1f ms.", FLAGS.repeats, 1e3 * ours_s,
               1e3 * torch_s)

  valid_BT = inputs["attention_mask"].astype(bool)
  max_abs_diff = float(np.abs(ours_logits_BTV[valid_BT] - torch_logits_BTV[valid_BT]).max())
  logging.info("Max |logit difference| on valid positions: %.3g.", max_abs_diff)

  tokens = B * T
  env = common.environment()
  common.print_result(dict(
      bench="forward",
      model=FLAGS.model,
      parameters=common.num_parameters(hf_model),
      batch=B,
      seq_len=T,
      valid_tokens=int(valid_BT.sum()),
      image_tokens_per_sample=int(image_tokens_B.max()),
      repeats=FLAGS.repeats,
      ours_tokens_per_s=tokens / ours_s,
      torch_tokens_per_s=tokens / torch_s,
      ratio=torch_s / ours_s,
      ours_compile_s=compile_s,
      ours_median_ms=1e3 * ours_s,
      torch_median_ms=1e3 * torch_s,
      max_abs_logit_diff=max_abs_diff,
      dtype="float32",
      torch_attn_implementation=hf_model.config._attn_implementation,
      jax_version=env["jax_version"],
      torch_version=env["torch_version"],
      transformers_version=env["transformers_version"],
      device=env["device"],
      threads=FLAGS.threads,
      cpu_count=env["cpu_count"],
      other_cpu_share=(None if other_load.share is None else round(other_load.share, 3)),
  ))


if __name__ == "__main__":
  app.run(main)
