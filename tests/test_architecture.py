"""The dependency direction is a checked contract: `lint-imports` (import-linter, contracts in
pyproject.toml) passes on the package, and fails when a lower layer imports a higher one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
  script = Path(sys.executable).with_name("lint-imports")
  env = dict(os.environ, PYTHONPATH=str(cwd))  # analyze this tree's allscope, not an install
  return subprocess.run([str(script), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)


def test_the_package_keeps_its_import_contracts():
  result = _lint_imports(ROOT)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "0 broken" in result.stdout


def test_a_kernel_importing_launch_breaks_the_contract(tmp_path):
  shutil.copytree(ROOT / "allscope", tmp_path / "allscope",
                  ignore=shutil.ignore_patterns("__pycache__", "static"))
  shutil.copy(ROOT / "pyproject.toml", tmp_path)
  with open(tmp_path / "allscope/kernels/xla.py", "a") as f:
    f.write("\nimport allscope.launch.cli  # a lower layer reaching up\n")
  result = _lint_imports(tmp_path)
  assert result.returncode != 0
  assert "BROKEN" in result.stdout
  assert "allscope.kernels.xla -> allscope.launch.cli" in result.stdout
