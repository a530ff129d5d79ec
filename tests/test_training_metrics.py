"""The metrics history across resumptions and kills (training/metrics.py)."""

import json
import logging

import pytest

from metaphorstar_jax.training import metrics as metrics_lib


def writer(workdir, **changes):
  values = dict(total_steps=10, use_tensorboard=False, progress_bar=False)
  values.update(changes)
  return metrics_lib.MetricsWriter(str(workdir), **values)


def write_steps(metrics, steps):
  for step in steps:
    metrics.write(step, {"reward/mean": step / 10, "accuracy": 0.5})


def steps_of(workdir):
  return [row["step"] for row in metrics_lib.read_history(str(workdir / "metrics.jsonl"))]


def test_a_resumed_run_writes_each_step_once(tmp_path, caplog):
  first = writer(tmp_path)
  write_steps(first, range(1, 8))  # killed after step 7; its last checkpoint is step 5
  first.close()
  caplog.set_level(logging.WARNING)
  resumed = writer(tmp_path, resume_step=5)
  assert "dropping 2 row(s) of steps 6-7" in caplog.text
  write_steps(resumed, range(6, 11))
  resumed.close()
  assert steps_of(tmp_path) == list(range(1, 11))


def test_a_resume_that_falls_back_to_an_older_step_rewinds_the_history(tmp_path):
  write_steps(writer(tmp_path), range(1, 8))  # checkpoints at 3 and 6; step 6 turns out damaged
  resumed = writer(tmp_path, resume_step=6)
  resumed.rewind(3)  # the newest step that restored
  write_steps(resumed, range(4, 9))
  assert steps_of(tmp_path) == list(range(1, 9))


@pytest.mark.parametrize("resume_step,purged", [(None, None), (0, 0), (5, 6)])
def test_tensorboard_hides_the_steps_a_run_writes_again(tmp_path, monkeypatch, resume_step,
                                                        purged):
  import tensorboardX
  opened = []

  class Spy(tensorboardX.SummaryWriter):
    def __init__(self, logdir, purge_step=None):
      opened.append(purge_step)
      super().__init__(logdir, purge_step=purge_step)

  monkeypatch.setattr(tensorboardX, "SummaryWriter", Spy)
  metrics = writer(tmp_path, use_tensorboard=True, resume_step=resume_step)
  if resume_step:
    metrics.rewind(2)
  metrics.close()
  assert opened == ([purged, 3] if resume_step else [purged])


def test_a_run_that_restored_nothing_starts_an_empty_history(tmp_path):
  first = writer(tmp_path)
  first.write(0, {"eval/accuracy": 0.25})  # the "before" evaluation
  write_steps(first, range(1, 4))  # killed before its first checkpoint
  writer(tmp_path, resume_step=0).write(0, {"eval/accuracy": 0.25})
  assert steps_of(tmp_path) == [0]


def test_resume_step_none_keeps_the_history(tmp_path):
  write_steps(writer(tmp_path), range(1, 4))
  write_steps(writer(tmp_path), [4])
  assert steps_of(tmp_path) == [1, 2, 3, 4]


@pytest.mark.parametrize("torn", [b'{"step": 4, "rew', '{"step": 4, "note": "é'.encode()[:-1]],
                         ids=["mid-row", "mid-character"])
@pytest.mark.parametrize("resume_step", [None, 3])
def test_a_torn_last_line_is_repaired_at_start(tmp_path, caplog, torn, resume_step):
  write_steps(writer(tmp_path), range(1, 4))
  path = tmp_path / "metrics.jsonl"
  whole = path.read_bytes()
  path.write_bytes(whole + torn)  # a kill in the middle of writing step 4
  caplog.set_level(logging.WARNING)
  resumed = writer(tmp_path, resume_step=resume_step)
  assert "unreadable line(s) [4]" in caplog.text and path.read_bytes() == whole
  write_steps(resumed, [4, 5])
  rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line is whole
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]


def test_read_history_skips_a_torn_last_line(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1, "kl": 0.1}\n{"step": 2, "k')
  caplog.set_level(logging.WARNING)
  assert metrics_lib.read_history(str(path)) == [{"step": 1, "kl": 0.1}]
  assert "unreadable line(s) [2]" in caplog.text
