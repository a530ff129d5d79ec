"""Rollout throughput: our on-device group sampler against transformers' `generate`.

Same random 'small' model (bench_models.md), same one-image prompts, fixed-length completions
(stop tokens ignored), fp32 on CPU, in one process. transformers draws the group with
`num_return_sequences=G`, which repeats every prompt G times (images included); we encode and
prefill each prompt once and its G rows share its KV cache. Prints one JSON line; logs go to
stderr.

    python bench/rollout.py                       # P=2,G=8 and P=16,G=5, 64 new tokens
    python -m bench.rollout --model tiny --shapes 2x2 --new_tokens 8 --repeats 1
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
flags.DEFINE_list("shapes", ["2x8", "16x5"], "Prompts x group size, one run each.")
flags.DEFINE_integer("new_tokens", 64, "Completion length (stop tokens are ignored).")
flags.DEFINE_integer("repeats", 3, "Timed calls per side; the median is reported.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads for the PyTorch side.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and the synthetic prompts.")


def parse_shape(text: str) -> tuple[int, int]:
  try:
    prompts, group = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--shapes entries look like 2x8 (prompts x group), got {text!r}.")
  if prompts < 1 or group < 1:
    raise app.UsageError(f"Prompts and group size must be positive, got {text!r}.")
  return prompts, group


def run_shape(hf_model, model, processor, prompts: int, group: int):
  import jax
  import torch

  from bench import common
  from metaphorstar_jax.sampling import Sampler, SamplingConfig

  new = FLAGS.new_tokens
  batch = common.synthetic_batch(prompts, FLAGS.seed, processor)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=new, temperature=1.0, top_p=1.0,
                                          stop_token_ids=()))
  keys = iter(jax.random.split(jax.random.key(FLAGS.seed), 1 + FLAGS.repeats))
  start = time.perf_counter()
  jax.block_until_ready(sampler(batch, group_size=group, key=next(keys)))  # compiles
  compile_s = time.perf_counter() - start

  torch_kwargs = common.torch_inputs(batch)

  def torch_generate():
    hf_model.model.rope_deltas = None
    with torch.no_grad():
      out = hf_model.generate(**torch_kwargs, do_sample=True, num_return_sequences=group,
                              max_new_tokens=new, min_new_tokens=new, temperature=1.0,
                              top_p=1.0, top_k=0, pad_token_id=common.SPECIAL_IDS["pad_token_id"])
    assert out.shape == (prompts * group, batch["input_ids"].shape[1] + new), out.shape

  def ours():
    rollouts = jax.block_until_ready(sampler(batch, group_size=group, key=next(keys)))
    assert int(rollouts.lengths_B.min()) == new

  torch_generate()  # warm-up
  with common.OtherLoad() as other_load:
    ours_s, torch_s = common.interleaved_medians([ours, torch_generate], FLAGS.repeats)
  if other_load.share is not None and other_load.share > 0.1:
    logging.warning("Other processes used %.0f%% of the CPUs while timing; rerun when idle.",
                    100 * other_load.share)
  tokens = prompts * group * new
  logging.info("P=%d G=%d: ours %.2f s, transformers %.2f s.", prompts, group, ours_s, torch_s)
  return dict(prompts=prompts, group_size=group, new_tokens=new,
              prompt_tokens=int(batch["input_ids"].shape[1]),
              ours_new_tokens_per_s=tokens / ours_s, torch_new_tokens_per_s=tokens / torch_s,
              ratio=torch_s / ours_s, ours_median_s=ours_s, torch_median_s=torch_s,
              ours_compile_s=compile_s, ours_compiled_programs=sampler.compiled_programs,
              other_cpu_share=None if other_load.share is None else round(other_load.share, 3))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import torch

  from bench import common

  shapes = [parse_shape(s) for s in FLAGS.shapes]
  torch.set_num_threads(FLAGS.threads)
  hf_model, model = common.load_model_pair(FLAGS.model, FLAGS.seed)
  processor = common.chat_processor()
  runs = [run_shape(hf_model, model, processor, p, g) for p, g in shapes]
  env = common.environment()
  common.print_result(dict(bench="rollout", model=FLAGS.model,
                           parameters=common.num_parameters(hf_model), dtype="float32",
                           sampling="temperature 1.0, top_p 1.0, fixed length", runs=runs,
                           threads=FLAGS.threads, **env))


if __name__ == "__main__":
  app.run(main)
