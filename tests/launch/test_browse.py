"""`allscope browse <release>` as a user runs it, on a run folder's store and release."""

from __future__ import annotations

import os
import subprocess
import sys

from allscope import models
from allscope.launch import cli
from allscope.release.browser.build import read_script
from tests.pipelines.helpers import write_random_store
from tests.release.browser.helpers import random_release, write_text_store


def _allscope(*args, timeout=300):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  return subprocess.run([sys.executable, "-m", "allscope.launch.cli", *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


def test_browse_writes_the_browser_into_an_existing_release(tmp_path):
  write_text_store(tmp_path / "store", models.describe("gemma3-270m")[1])
  root, _ = random_release(tmp_path)
  out = _allscope("browse", str(root), "browse.logits=false", "browse.batch_size=12")
  assert out.returncode == 0, out.stderr
  assert "browser:" in out.stdout and "4 dictionaries" in out.stdout
  assert (root / "browser" / "index.html").exists()
  key, block = read_script(root / "browser" / "data" / "u000" / "block_0.js")
  assert key == "u000/block_0" and block["latents"][0]["contexts"]
  assert "promoted" not in block["latents"][0]  # browse.logits=false: no model weights read


def test_browse_refuses_a_folder_that_is_not_a_release(tmp_path, capsys):
  assert cli.main(["browse", str(tmp_path), "browse.logits=false"]) == 2
  assert "no manifest.json; give a release folder" in capsys.readouterr().err


def test_browse_refuses_a_store_without_the_dictionaries_sites(tmp_path, capsys, monkeypatch):
  """Checked before the model or its tokenizer loads: the store lacks layer 4."""
  write_random_store(tmp_path / "store", layers=(1, 2))
  root, _ = random_release(tmp_path)
  monkeypatch.setattr(models, "describe", None)  # any load would fail loudly
  assert cli.main(["browse", str(root)]) == 2
  assert "reads mlp_out at layer 4, but the store" in capsys.readouterr().err
