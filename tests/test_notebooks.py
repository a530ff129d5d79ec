"""The notebooks' code cells run top to bottom, each notebook in a fresh interpreter on one CPU
device as in Colab (executed without Jupyter). A notebook's cell tagged "parameters" can be
overridden right after it runs (papermill's convention), e.g. to run it in a reduced mode."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).parent.parent / "notebooks"
# Values set after a notebook's "parameters" cell, given the test's tmp_path.
PARAMETERS = {
    "ablations.ipynb": lambda tmp_path: {"MODE": "reduced", "ROOT": str(tmp_path / "grid")},
}
SLOW = {"ablations.ipynb"}
RUNNER = """
import json, sys
path, overrides = sys.argv[1], json.loads(sys.argv[2])
namespace = {}
for cell in json.load(open(path))["cells"]:
  if cell["cell_type"] == "code":
    exec(compile("".join(cell["source"]), path, "exec"), namespace)
    if "parameters" in cell["metadata"].get("tags", []):
      namespace.update(overrides)
"""
NOTEBOOKS = [pytest.param(p, marks=pytest.mark.slow, id=p.name) if p.name in SLOW
             else pytest.param(p, id=p.name) for p in sorted(NOTEBOOK_DIR.glob("*.ipynb"))]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs(path, tmp_path):
  overrides = PARAMETERS.get(path.name, lambda _: {})(tmp_path)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", RUNNER, str(path), json.dumps(overrides)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
