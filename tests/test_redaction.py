"""Secrets stay out of what a run writes: the redaction rules, and a judged training run, its
resumption and the evaluation CLI, searched file by file for the judge's key."""

import json
import os
import sys
import types

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags
from helpers import JudgeServer

from metaphorstar_jax import evaluate, judge as judge_lib, redaction, train
from metaphorstar_jax.training import evaluation_report, hf_export

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
JUDGED_CONFIG = os.path.join(CONFIGS, "tfq_grpo_7b.py") + ":smoke"
KEY = "sk-test-4d1f9a07-never-written-anywhere"
# Fewer programs to compile than the smoke mode's 2 x 2 micro-batches; the secrets are the same.
SMALLER = ["--config.train.num_minibatches=1", "--config.train.grad_accum_steps=1",
           "--config.train.prompts_per_step=2", "--config.model.remat=False",
           "--config.model.remat_offload=False"]


# --- the rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["judge.api_key", "api_key", "apiKey", "OPENAI_API_KEY",
                                  "hf.token", "auth_token", "HF_TOKEN", "db.password",
                                  "client_secret", "secret", "x.authorization",
                                  "aws.access_key", "credentials"])
def test_secret_names(path):
  assert redaction.is_secret(path)


@pytest.mark.parametrize("path", ["model.tokenizer", "rl.max_new_tokens", "judge.max_tokens",
                                  "data.max_prompt_tokens", "judge.cache_path", "judge.base_url",
                                  "model.preset", "keep", "cache_key", "api_base"])
def test_ordinary_names(path):
  assert not redaction.is_secret(path)


def test_redact_replaces_non_empty_secret_strings_and_scrubs_the_rest():
  config = ml_collections.ConfigDict(dict(
      judge=dict(api_key=KEY, base_url=f"https://judge.example/v1?key={KEY}", model="m"),
      hub=dict(token="", password=None),
      model=dict(tokenizer="small", stop_token_ids=[1, 2]),
      stages=[ml_collections.ConfigDict(dict(name="grpo", secret="hunter22"))]))
  redacted = redaction.redact(config)
  assert isinstance(redacted, ml_collections.ConfigDict)
  assert redacted.judge.api_key == redaction.REDACTED
  assert redacted.judge.base_url == f"https://judge.example/v1?key={redaction.REDACTED}"
  assert redacted.hub.token == "" and redacted.hub.password is None  # "none set" stays readable
  assert redacted.model.tokenizer == "small" and list(redacted.model.stop_token_ids) == [1, 2]
  assert redacted.stages[0]["secret"] == redaction.REDACTED and redacted.stages[0]["name"] == "grpo"
  assert config.judge.api_key == KEY  # a copy: the run keeps its key
  assert KEY not in redacted.to_json_best_effort() and "hunter22" not in str(redacted)

  plain = redaction.redact({"detail": f"m at {KEY}", "rows": [(f"x{KEY}", 3)]}, [KEY])
  assert plain == {"detail": f"m at {redaction.REDACTED}",
                   "rows": [(f"x{redaction.REDACTED}", 3)]}


def test_secret_values_and_scrub():
  environ = {judge_lib.ENV_API_KEY: "env-key-123", "METAPHORSTAR_JUDGE_URL": "http://h",
             "GITHUB_TOKEN": "not-ours"}
  found = redaction.secret_values({"judge": {"api_key": KEY, "model": "m"}}, environ)
  assert found == [KEY, "env-key-123"]
  line = f"failed: Bearer {KEY} (env-key-123)"
  assert redaction.scrub(line, found) == "failed: Bearer <redacted> (<redacted>)"
  # One pass: a secret that is part of REDACTED's own text does not mangle the replacement.
  assert redaction.scrub("a dact b", ["dact", "redacted"]) == "a <redacted> b"
  assert redaction.scrub("a b c", ["a"]) == "a b c"  # too short to be a credential


# --- a judged run, end to end -------------------------------------------------------------------

class FakeWandb(types.ModuleType):
  """Stands in for the wandb module: keeps the config each run was started with."""

  def __init__(self):
    super().__init__("wandb")
    self.configs = []

  def init(self, project, dir, config):  # noqa: A002  (wandb's own argument name)
    self.configs.append(config)
    return types.SimpleNamespace(log=lambda *args, **kwargs: None, finish=lambda: None)


def parse_config(argv):
  """The config the command line `argv` gives, parsed as train's --config flag is."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def everything_written(folder):
  """{path: bytes} of every file under `folder`."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        found[path] = handle.read()
  return found


@pytest.mark.slow  # two short trainings and two evaluations: about 90 s on two busy cores
def test_the_judge_key_is_nowhere_a_judged_run_writes(tmp_path, monkeypatch, caplog, capfd):
  monkeypatch.delenv(judge_lib.ENV_API_KEY, raising=False)
  fake_wandb = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
  caplog.set_level("INFO")
  workdir, eval_dir, env_eval_dir = tmp_path / "run", tmp_path / "eval", tmp_path / "eval_env"
  with JudgeServer(default_reply=f"[4 points] (you sent {KEY})") as server:
    judged = [f"--config.judge.base_url={server.url}", "--config.judge.model=local-judge",
              "--config.judge.repeats=1", "--config.data.task=tfq_osq",
              "--config.eval.num_examples=2", "--config.log.progress_bar=False"]
    config = parse_config(["train", f"--config={JUDGED_CONFIG}", f"--config.workdir={workdir}",
                           f"--config.judge.api_key={KEY}", "--config.log.wandb_project=test",
                           "--config.checkpoint.async_save=False", *SMALLER, *judged])
    results = train.train(config)
    assert len(results["evaluations"]) == 3  # before, inside and after the stage
    assert "judge/score" in results["after grpo"]
    assert server.requests and all(headers["Authorization"] == f"Bearer {KEY}"
                                   for headers, _ in server.requests)
    evaluate.cli(["evaluate", f"--config={JUDGED_CONFIG}", f"--checkpoint={workdir}",
                  f"--output_dir={eval_dir}", f"--config.judge.api_key={KEY}", *judged])

    # Read back from the run folder, the key is not there to use: it must be given again.
    saved = hf_export.load_run_config(str(workdir))
    assert saved.judge.api_key == redaction.REDACTED
    with pytest.raises(judge_lib.JudgeError, match=judge_lib.ENV_API_KEY):
      judge_lib.JudgeConfig.resolve(saved.judge.to_dict(), environ={})

    # Resuming and evaluating a checkpoint need the key only from the environment.
    monkeypatch.setenv(judge_lib.ENV_API_KEY, KEY)
    os.remove(workdir / "eval" / "judge_cache.jsonl")  # so that the judge is asked again
    asked = len(server.requests)
    config.judge.api_key = ""
    resumed = train.train(config)  # from the last checkpoint, step 2: only "after grpo" is left
    assert [(e["tag"], e["step"]) for e in resumed["evaluations"]] == [("after grpo", 2)]
    assert len(server.requests) > asked
    asked = len(server.requests)
    again = evaluate.cli(["evaluate", f"--config={JUDGED_CONFIG}", f"--checkpoint={workdir}",
                          f"--output_dir={env_eval_dir}", *judged])
    assert again["step"] == 2 and "judge/score" in again["metrics"]
    assert len(server.requests) > asked
    assert all(headers["Authorization"] == f"Bearer {KEY}" for headers, _ in server.requests)

  written = {path: data for folder in (workdir, eval_dir, env_eval_dir)
             for path, data in everything_written(folder).items()}
  for name in ("config.json", "metrics.jsonl", os.path.join("eval", "judge_cache.jsonl")):
    assert str(workdir / name) in written, name
  for name in (evaluation_report.RESULTS_JSON, evaluation_report.RESULTS_MD, evaluation_report.COMPLETIONS,
               "judge_cache.jsonl"):
    assert str(eval_dir / name) in written, name
  leaks = [path for path, data in written.items() if KEY.encode() in data]
  assert not leaks
  assert len(fake_wandb.configs) == 2
  # The first run had the key (redacted); the resumed one none (empty), in whichever order the
  # writers reached W&B.
  assert sorted(c["judge"]["api_key"] for c in fake_wandb.configs) == ["", "<redacted>"]
  assert KEY not in json.dumps(fake_wandb.configs, default=str)
  assert "Evaluation" in caplog.text and KEY not in caplog.text
  out, err = capfd.readouterr()
  assert KEY not in out and KEY not in err
