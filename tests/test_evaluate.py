"""training/evaluation.py and its command line (metaphorstar_jax.evaluate) on the tiny random
model: the command line, miniatures of the real data layouts, training checkpoints, repeats, and
OSQ graded by a local judge server."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import JudgeServer

from metaphorstar_jax import evaluate, judge as judge_lib, sharding as sharding_lib
from metaphorstar_jax.models import qwen2_5_vl
from metaphorstar_jax.sampling import Sampler
from metaphorstar_jax.tasks import get_task, load_records, write_miniature
from metaphorstar_jax.training import builders, checkpoints, evaluation, evaluation_report
from metaphorstar_jax.training import evaluation_setup

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_arg(name):
  return f"--config={os.path.join(CONFIGS, name)}:smoke"


def read_outputs(folder):
  with open(os.path.join(folder, evaluation_report.RESULTS_JSON)) as handle:
    results = json.load(handle)
  with open(os.path.join(folder, evaluation_report.RESULTS_MD)) as handle:
    table = handle.read()
  with open(os.path.join(folder, evaluation_report.COMPLETIONS)) as handle:
    completions = [json.loads(line) for line in handle]
  return results, table, completions


def test_cli_on_shapes_writes_json_and_markdown_and_prints_the_table(tmp_path, capsys):
  out = str(tmp_path / "eval")
  evaluate.main(["evaluate", config_arg("tfq_grpo_tiny.py"), f"--output_dir={out}",
                 "--config.eval.num_examples=6"])
  results, table, completions = read_outputs(out)
  assert results["task"] == "shapes" and results["num_records"] == 6
  assert results["data"] == "generated" and results["model"] == "random preset tiny"
  assert results["sampling"]["greedy"] and results["sampling"]["num_samples"] == 1
  metrics = results["metrics"]
  for name in ("accuracy", "group_accuracy", "format_rate", "score/overall"):
    assert 0.0 <= metrics[name] <= 1.0
  assert metrics["num_questions"] == 6
  assert len(results["repeats"]) == 1 and results["judge"]["used"] is False
  assert len(completions) == 6 and {c["repeat"] for c in completions} == {0}
  assert all(isinstance(c["completion"], str) and "overall" in c["score"] for c in completions)
  assert "| metric | value |" in table
  assert f"| accuracy | {metrics['accuracy']:.4f} |" in table
  assert table in capsys.readouterr().out


def test_cli_on_a_tvr_miniature(tmp_path):
  data = write_miniature("tvr", str(tmp_path / "tvr"), 3, seed=2)
  out = str(tmp_path / "eval")
  result = evaluate.cli(["evaluate", config_arg("star_r1_7b.py"), f"--output_dir={out}",
                         f"--config.data.eval={data}"])
  results, table, completions = read_outputs(out)
  assert results["task"] == "tvr" and results["data"] == data and results["num_records"] == 3
  for name in ("acc", "loose_acc", "avg_dist", "reward", "n_center"):
    assert name in results["metrics"] and f"| {name} |" in table
  assert results["metrics"] == pytest.approx(result["metrics"])
  assert [c["id"] for c in completions] == [f"tvr-2-{i}" for i in range(3)]


def test_file_backed_task_without_data_needs_the_miniature_asked_for(tmp_path):
  """It fell back to a synthetic miniature with only a warning; on a pod that wastes the whole
  allocation. Smoke configs ask for it (data.miniature=True)."""
  config = train_config("rewardmap_7b.py")
  assert config.data.miniature
  task = builders.eval_task(config)
  records, source = builders.eval_records(config, task, str(tmp_path))
  assert source.startswith("miniature:") and os.path.exists(source.split(":", 1)[1])
  assert 0 < len(records) <= config.eval.num_examples
  full = train_config("rewardmap_7b.py", smoke=False)
  full.workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"config\.data\.train is empty.*data\.miniature=True"):
    builders.load_data(full)
  full.data.train = str(os.path.join(source.split(":", 1)[1]))
  with pytest.raises(ValueError, match=r"config\.data\.eval is empty"):
    builders.load_data(full)


def train_config(name, smoke=True):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(smoke=smoke)


def test_checkpoint_params_are_restored_and_evaluated(tmp_path):
  config = train_config("tfq_grpo_tiny.py")
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
  trained = qwen2_5_vl.init(qwen2_5_vl.preset("tiny"), seed=7)  # not config.seed's weights
  _, params = nnx.split(trained)
  pure = nnx.to_pure_dict(params)
  run_dir = tmp_path / "run"
  saver = checkpoints.Checkpointer(str(run_dir / "checkpoints"), async_save=False)
  for step in (2, 3):
    saver.save(step, {"params": pure, "opt_state": optax.adam(1e-3).init(pure),
                      "ref_params": pure}, {"position": step}, {"stage_index": 0})
  saver.close()

  for path, step, expected in ((run_dir, None, 3), (run_dir / "checkpoints", 2, 2),
                               (run_dir / "checkpoints" / "2", None, 2)):
    model, restored_step = evaluation.restore_policy(config, str(path), mesh, step)
    assert restored_step == expected
  got = jax.tree.leaves(nnx.state(model))
  want = jax.tree.leaves(params)
  assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))

  result = evaluate.cli(["evaluate", config_arg("tfq_grpo_tiny.py"), f"--checkpoint={run_dir}"])
  assert result["step"] == 3 and result["model"] == f"checkpoint {run_dir}"
  assert result["paths"]["json"] == str(run_dir / "eval" / "step_3" / evaluation_report.RESULTS_JSON)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.checkpoint_location(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="saved steps"):
    evaluation.restore_policy(config, str(run_dir), mesh, step=5)


def test_trainer_call_with_repeats_averages_the_metrics():
  config = train_config("tfq_grpo_tiny.py")
  config.eval.num_examples = 4
  mesh = sharding_lib.make_mesh(**config.mesh.to_dict())
  processor = builders.build_processor(config)
  model = builders.build_model(config, mesh)
  task, _, records = builders.load_data(config)
  _, params = nnx.split(model)
  greedy = Sampler(model, evaluation_setup.sampling_config(config, "greedy"), mesh=mesh)
  with pytest.raises(ValueError, match="identical runs"):
    evaluation.run_evaluation(config, params, sampler=greedy, processor=processor, task=task,
                              records=records, num_samples=2, write=False)

  config.eval.temperature, config.eval.top_p = 1.0, 1.0
  sampled = evaluation_setup.sampling_config(config, "validation")
  assert (sampled.greedy, sampled.temperature) == (False, 1.0)
  sampler = Sampler(model, sampled, mesh=mesh)
  result = evaluation.run_evaluation(config, params, sampler=sampler, processor=processor,
                                     task=task, records=records, num_samples=3, write=False,
                                     tag="step 5")
  assert len(result["repeats"]) == 3 and len(result["completions"]) == 3 * len(records)
  for name, mean in result["metrics"].items():
    values = [r[name] for r in result["repeats"]]
    assert mean == pytest.approx(np.mean(values))
    assert result["metrics_std"][name] == pytest.approx(np.std(values))
  assert "mean ± std over 3 samples" in result["markdown"] and "(step 5)" in result["markdown"]
  assert "paths" not in result


def test_osq_is_graded_by_the_judge_and_resumes_from_its_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(judge_lib.ENV_API_KEY, "test-key")
  out = str(tmp_path / "eval")
  with JudgeServer(default_reply="[3 points]") as server:
    server.then(("reply", "no grade here"))
    result = evaluate.cli(["evaluate", config_arg("tfq_grpo_7b.py"), f"--output_dir={out}",
                           "--config.data.task=tfq_osq", f"--config.judge.base_url={server.url}",
                           "--config.judge.model=local-judge"])
    results, table, completions = read_outputs(out)
    n = results["num_records"]
    assert n > 0 and len(server.requests) == 3 * n  # §1.8: 3 repeats per answer
    assert server.requests[0][0]["Authorization"] == "Bearer test-key"
    metrics = results["metrics"]
    assert metrics["judge/score"] == 3.0 and metrics["judge/malformed_replies"] == 1
    assert metrics["judge/missing"] == 0 and metrics["judge/judged"] == n
    assert results["judge"]["used"] and results["judge"]["requests"] == 3 * n
    assert "| judge/score | 3.0000 |" in table
    assert sorted(c["judge"]["grades"].count(None) for c in completions)[-1] == 1

    # A second scoring of the same completions reads every reply from the cache.
    cache = os.path.join(out, "judge_cache.jsonl")
    judge = judge_lib.Judge(judge_lib.JudgeConfig(base_url=server.url, model="local-judge",
                                                  cache_path=cache))
    task = get_task("tfq_osq")
    records, _ = load_records(task, result["data"].split(":", 1)[1], limit=n)
    again, _ = evaluation.score_completions(task, records,
                                            [c["completion"] for c in completions], judge)
    assert len(server.requests) == 3 * n and judge.stats["cache_hits"] == 3 * n
    assert again["judge/score"] == metrics["judge/score"]


@pytest.mark.parametrize("name", ["tfq_grpo_tiny.py", "rewardmap_7b.py", "star_r1_7b.py",
                                  "cinema_7b.py", "tfq_grpo_7b.py"])
def test_validation_sampling_samples_and_its_settings_are_overridable(name):
  config = train_config(name, smoke=False)
  sampling = evaluation_setup.sampling_config(config, "validation")
  assert not sampling.greedy and sampling.temperature > 0
  config.eval.temperature = 0.7  # a declared field: the command-line override works
  assert evaluation_setup.sampling_config(config, "validation").temperature == 0.7


def test_repeats_of_greedy_decoding_are_refused_naming_the_cause():
  config = train_config("rewardmap_7b.py", smoke=False)
  config.eval.temperature = 0.0
  sampling = evaluation_setup.sampling_config(config, "validation")
  with pytest.raises(ValueError, match="eval.temperature resolves to 0"):
    evaluation_setup.check_repeats(3, sampling)


def test_evaluation_skips_and_counts_what_training_would_skip(tmp_path):
  """A 20000×20 image passed the reader and crashed evaluation (training skips it), and
  evaluation records had no prompt-length check; both are counted skips now, and the other
  records are scored."""
  import dataclasses

  from PIL import Image
  config = train_config("tfq_grpo_tiny.py")
  config.eval.num_examples = 4
  config.workdir = str(tmp_path / "run")
  task, _, records = builders.load_data(config)
  sliver = Image.new("RGB", (20, 20000))
  long_prompt = dataclasses.replace(records[2], id="long", prompt="word " * 5000)
  records = [records[0], dataclasses.replace(records[1], id="sliver", images=(sliver,)),
             long_prompt, records[3]]
  result = evaluation.run_evaluation(config, task=task, records=records, write=False)
  assert result["skipped"] == {"ValueError": 1, "too_long": 1}
  assert result["num_records"] == 4 and result["num_scored"] == 2
  assert [c["id"] for c in result["completions"]] == [records[0].id, records[3].id]


def test_a_split_folder_keeps_test_rows_out_of_training(tmp_path):
  """A Hugging Face-style folder (data/train-*.parquet beside data/test-*.parquet) was read as one
  dataset, so test rows were trained on."""
  import shutil

  import pandas as pd
  tfq = get_task("tfq")
  written = tfq.write_miniature(str(tmp_path / "mini"), 6, 0)
  rows = pd.read_parquet(written)
  folder = tmp_path / "TFQ" / "data"
  folder.mkdir(parents=True)
  rows.iloc[:4].to_parquet(folder / "train-00000-of-00001.parquet")
  rows.iloc[4:].to_parquet(folder / "test-00000-of-00001.parquet")
  config = train_config("tfq_grpo_7b.py")
  config.workdir = str(tmp_path / "run")
  config.data.train = config.data.eval = str(tmp_path / "TFQ")
  _, train_records, eval_records = builders.load_data(config)
  train_ids, eval_ids = {r.id for r in train_records}, {r.id for r in eval_records}
  assert train_ids and eval_ids and not train_ids & eval_ids
  assert len(train_records) < len(rows) and len(eval_records) < len(rows)
  shutil.rmtree(tmp_path / "mini")
