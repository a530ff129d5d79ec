"""Helpers several test modules share (test modules never import each other).

Paths and runs: `REPO_ROOT`, `CONFIG` (the README's default config file), `scaled_down_flags` (its
command line scaled down), `smoke_config`/`smoke_default_config` (its smoke mode as a ConfigDict),
`history` (a run's metrics.jsonl by step, without wall-clock figures). Model inputs: `tiny_batch`
(two prompts for the tiny preset, one with two images), `shapes_prompt_batches` (real one-image
prompts), `scored_groups` (a batch's ScoredGroups with given rewards and traceable rows). Updates:
`optim_config` and `make_steps` (a TrainSteps with its optimizer state).
Checkpoints: `run_like_arrays` (a small tree like a run's), `save_steps` (a checkpoint folder of
such steps), `largest_data_file` (a step's biggest array file, to damage).

`JudgeServer` is a scripted OpenAI-style chat-completions endpoint on 127.0.0.1: it answers
POST /v1/chat/completions from a thread on an ephemeral port (GET too, where a redirect turned the
POST into one). Each request takes the next planned action (a reply text, an HTTP status, a
non-JSON body, a delay, a trickled reply, or a redirect), else the default reply; it serves at
most `max_requests` and shuts down when its `with` block ends.
"""

import collections
import glob
import http.server
import importlib.util
import json
import os
import threading
import time

import ml_collections
import numpy as np

from hf_reference import random_pixels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "configs", "tfq_grpo_tiny.py")
# Wall-clock figures differ between runs; everything else must match exactly.
TIMING_KEYS = {"step_seconds", "sample_seconds", "rollout_tokens_per_s"}


def scaled_down_flags(workdir, sft_steps=2, grpo_steps=3):
  """Command-line flags for `CONFIG` at a few steps, prompts and tokens, checkpointing each step."""
  return [f"--config={CONFIG}", f"--config.workdir={workdir}", "--config.log.progress_bar=False",
          "--config.train.prompts_per_step=2", "--config.rl.group_size=2",
          "--config.rl.max_new_tokens=6", "--config.eval.num_examples=2",
          "--config.eval.every=0", "--config.checkpoint.every=1",
          "--config.checkpoint.async_save=False",
          f"--config.stages[0].steps={sft_steps}", f"--config.stages[1].steps={grpo_steps}",
          "--config.data.task_options.num_records=16",
          "--config.data.eval_task_options.num_records=4"]


def history(workdir):
  """step -> the training row of `workdir`/metrics.jsonl, without `TIMING_KEYS` (no eval rows)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: {k: v for k, v in row.items() if k not in TIMING_KEYS}
          for row in rows if "eval/accuracy" not in row}


def smoke_config(path):
  """`get_config(smoke=True)` of the config file at `path`."""
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(smoke=True)


def smoke_default_config(workdir):
  """The README default in smoke mode on a few records, checkpointing synchronously."""
  config = smoke_config(CONFIG)
  config.workdir = str(workdir)
  config.log.progress_bar = False
  config.data.task_options = dict(config.data.task_options, num_records=16)
  config.data.eval_task_options = dict(config.data.eval_task_options, num_records=4)
  config.checkpoint.async_save = False
  return config


def assert_close_to_largest(got, want, rtol=1e-5):
  """|got - want| at most `rtol` of want's largest entry: for sums a change reorders (a
  recomputed or chunked pass, a mesh), where an entry summed from cancelling terms can be off by
  more than its own relative tolerance."""
  got, want = np.asarray(got), np.asarray(want)
  worst = np.abs(got - want).max()
  assert worst <= rtol * max(np.abs(want).max(), 1e-30), worst


def tiny_batch(cfg, seed=0):
  """Two left-padded prompts for the model config `cfg`: row 0 holds two images (grids 1x4x8 and
  1x6x4), row 1 is text only. Returns the model's keyword arguments as numpy arrays."""
  rng = np.random.default_rng(seed)
  grids = np.asarray([[1, 4, 8], [1, 6, 4]], np.int32)
  pad, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
  text = lambda n: rng.integers(0, 1990, n).tolist()
  row0 = text(3) + [start] + [pad] * 8 + [end] + text(4) + [start] + [pad] * 6 + [end] + text(2)
  row1 = text(12)
  T = len(row0)
  ids = np.zeros((2, T), np.int32)
  mask = np.zeros((2, T), np.int32)
  ids[0], mask[0] = row0, 1
  ids[1, T - len(row1):], mask[1, T - len(row1):] = row1, 1
  return dict(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(rng, grids),
              image_grid_thw=grids)


def shapes_prompt_batches(count, *, num_records, seed, batch_size=4):
  """`count` batches of real one-image prompts (56 px shapes, statement only), in order."""
  from metaphorstar_jax import data
  from metaphorstar_jax.data.pipeline import PromptStream
  from metaphorstar_jax.tasks import get_task, load_records
  task = get_task("shapes", num_records=num_records, image_size=56, min_shapes=1, max_shapes=3,
                  prompt="statement", seed=seed)
  records, _ = load_records(task, None)
  processor = data.ChatProcessor.from_tokenizer(
      data.build_small_tokenizer(), data.ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56))
  stream = PromptStream(records, processor, task.build_conversation, batch_size=batch_size,
                        seed=0, shuffle=False, max_prompt_tokens=512)
  return [stream.next_batch() for _ in range(count)]


def scored_groups(batch, sampler, rewards_PG, tag=1, new_tokens=3):
  """ScoredGroups for a prompt `batch` with the given [P, G] rewards (shaped ones equal) and
  made-up rows of `new_tokens` tokens: every token of row b is 100·tag + b, so a test can trace
  where each row went."""
  from metaphorstar_jax.training.rollout import RolloutRows, ScoredGroups
  rewards = np.asarray(rewards_PG, np.float32).reshape(-1)
  B = len(rewards)
  rows = RolloutRows(
      tokens_BN=np.stack([np.full(new_tokens, 100 * tag + r, np.int32) for r in range(B)]),
      mask_BN=np.ones((B, new_tokens), np.int32),
      sampler_logprobs_BN=np.zeros((B, new_tokens), np.float32),
      lengths_B=np.full(B, new_tokens, np.int32), truncated_B=np.zeros(B, bool))
  scores = [{"overall": float(r), "accuracy": float(r)} for r in rewards]
  return ScoredGroups(list(batch.records), list(batch.examples), sampler.prepare(batch.arrays),
                      rows, rewards, rewards.copy(), scores)


def optim_config():
  """A complete `optim` config: AdamW at 1e-3, constant, clipped at 1.0, nothing frozen."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="constant",
      final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
      max_consecutive_nonfinite=3, frozen=()))


def make_steps(model, loss_config=None):
  """(TrainSteps, params, optimizer state) for `model` under `optim_config()` and `loss_config`
  (default: the metaphorstar preset's loss)."""
  from flax import nnx
  from metaphorstar_jax import rl
  from metaphorstar_jax.training import optimizer, step as step_lib
  optim = optimizer.make_optimizer(optim_config())
  graphdef, params = nnx.split(model)
  steps = step_lib.TrainSteps(graphdef, optim, loss_config or rl.preset("metaphorstar").loss,
                              temperature=1.0)
  return steps, params, step_lib.init_optimizer_state(optim, params)



def run_like_arrays(scale: float) -> dict:
  """A small tree like a run's: float parameters big enough to span a data file, counters."""
  import jax.numpy as jnp
  return {"params": {"kernel": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) * scale,
                     "bias": jnp.full((8,), scale, jnp.bfloat16)},
          "opt_state": {"count": jnp.int32(3), "finite": jnp.array(True)}}


def save_steps(directory, steps=(1, 2, 3), async_save=False):
  """Saves `run_like_arrays(step)` at each of `steps` under `directory`, data position = step,
  meta {"stage_index": 0, "step": step}."""
  from metaphorstar_jax.training import checkpoints
  with checkpoints.Checkpointer(directory, async_save=async_save) as ckpt:
    for step in steps:
      ckpt.save(step, run_like_arrays(step), {"position": step}, {"stage_index": 0, "step": step},
                {"config": {"seed": 0}})


def largest_data_file(directory, step):
  """The largest array data file of step `step` under the Orbax folder `directory`."""
  files = glob.glob(os.path.join(directory, str(step), "arrays", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)

class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # a client that timed out closes its socket; writing the late reply then fails


class JudgeServer:
  """A scripted chat-completions endpoint; `requests` holds (headers, JSON body or None) of each
  call and `paths` its (method, path)."""

  def __init__(self, default_reply="[4 points]", max_requests=200):
    self.default_reply = default_reply
    self.max_requests = max_requests
    self.plan = collections.deque()
    self.requests = []
    self.paths = []
    self._lock = threading.Lock()
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # keep test output quiet
        pass

      def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with owner._lock:
          owner.requests.append((dict(self.headers), json.loads(body) if body else None))
          owner.paths.append((self.command, self.path))
          count = len(owner.requests)
          action = owner.plan.popleft() if owner.plan else ("reply", None)
        if not self.path.endswith("/chat/completions"):
          return self._send(404, b'{"error": "no such route"}')
        if count > owner.max_requests:
          return self._send(400, b'{"error": "request budget of the test server spent"}')
        kind, value = action
        if kind == "redirect":  # value: (status, Location)
          return self._send(value[0], b"", location=value[1])
        if kind == "status":  # value: a status, (status, body) or (status, body, headers)
          value = value if isinstance(value, tuple) else (value, b'{"error": "failed"}')
          status, data, headers = (value + ({},))[:3]
          return self._send(status, data, headers=headers)
        if kind == "garbage":
          return self._send(200, b"<html>not json</html>")
        if kind == "unsized":  # value: a reply text, sent without Content-Length (read to EOF)
          return self._send(200, self._completion(count, value), sized=False)
        if kind == "trickle":  # value: seconds between bytes of the default reply, sent one by one
          return self._trickle(self._completion(count, owner.default_reply), value)
        if kind == "sleep":
          time.sleep(value)
          value = None
        reply = value if value is not None else owner.default_reply
        if callable(reply):
          reply = reply(json.loads(body) if body else None)
        return self._send(200, self._completion(count, reply))

      do_GET = do_POST

      @staticmethod
      def _completion(count, reply):
        return json.dumps({"id": f"test-{count}", "object": "chat.completion",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply}}]}
                          ).encode()

      def _trickle(self, data, pause):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for index in range(len(data)):
          try:
            self.wfile.write(data[index:index + 1])
            self.wfile.flush()
          except OSError:
            return  # the client hung up
          time.sleep(pause)

      def _send(self, status, data, location=None, headers=(), sized=True):
        self.send_response(status)
        for name, value in dict(headers).items():
          self.send_header(name, value)
        if location:
          self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        if sized:
          self.send_header("Content-Length", str(len(data)))
        else:
          self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    self._server = _QuietServer(("127.0.0.1", 0), Handler)
    self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
    self.url = self.origin + "/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=5)

  def then(self, *actions):
    """Plans the next requests' actions, e.g. then(("status", 500), ("reply", "[2 points]"))."""
    self.plan.extend(actions)
    return self
