"""allscope.files: digests match hashlib, writes are atomic and readable per the umask, and the
same calls work on local paths and fsspec URLs."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import fsspec
import numpy as np
import pytest
from safetensors.numpy import save_file

from allscope import files


@pytest.fixture
def umask():
  """Sets the process umask for one test and restores it."""
  saved = []

  def set_(mask: int):
    saved.append(os.umask(mask))

  yield set_
  if saved:
    os.umask(saved[0])


def test_digest_is_sha256_of_the_bytes(tmp_path):
  data = np.random.default_rng().bytes(3 * (1 << 20) + 17)
  (tmp_path / "x").write_bytes(data)
  assert files.digest(tmp_path / "x") == hashlib.sha256(data).hexdigest()
  assert files.git_blob_sha1(tmp_path / "x") == hashlib.sha1(
      f"blob {len(data)}\0".encode() + data).hexdigest()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_take_their_mode_from_the_umask(tmp_path, umask, mask, mode):
  umask(mask)
  files.write_text(tmp_path / "a.json", "{}")
  files.atomic_write(tmp_path / "b.bin", lambda tmp: open(tmp, "wb").write(b"x"))
  files.copy(tmp_path / "b.bin", tmp_path / "c.bin")
  # safetensors replaces the file it is given with a 0600 one; the rename restores the mode
  files.atomic_write(tmp_path / "d.safetensors",
                     lambda tmp: save_file({"x": np.zeros(3, np.float32)}, tmp))
  for name in ("a.json", "b.bin", "c.bin", "d.safetensors"):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  files.write_text(tmp_path / "m.json", "old")

  def fail(tmp):
    open(tmp, "w").write("half")
    raise OSError(errno.ENOSPC, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    files.atomic_write(tmp_path / "m.json", fail)
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_open(tmp_path / "m.json") as f:
      f.write(b"half")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["m.json"]
  assert (tmp_path / "m.json").read_text() == "old"


def test_atomic_write_returns_what_the_writer_returned(tmp_path):
  out = files.atomic_write(tmp_path / "d/e/f.bin", lambda tmp: (open(tmp, "wb").write(b"abc"),
                                                                os.path.getsize(tmp)))
  assert out == (3, 3) and (tmp_path / "d/e/f.bin").read_bytes() == b"abc"


def test_temporary_names_are_hidden_and_recognized(tmp_path):
  seen = []
  files.atomic_write(tmp_path / "x.bin", lambda tmp: seen.append(os.path.basename(tmp)))
  assert files.is_temporary(seen[0]) and seen[0].startswith(".x.bin")
  assert not files.is_temporary("x.bin") and not files.is_temporary(".hidden")


def test_the_same_calls_work_on_a_url():
  fs = fsspec.filesystem("memory")
  root = "memory://allscope-test-files"
  files.remove(root)
  files.write_text(files.join(root, "a/m.json"), '{"k": 1}')
  files.atomic_write(files.join(root, "a/b.bin"), lambda tmp: open(tmp, "wb").write(b"xyz"))
  files.copy(files.join(root, "a/b.bin"), files.join(root, "c.bin"))
  assert files.read_json(files.join(root, "a/m.json")) == {"k": 1}
  assert files.exists(files.join(root, "c.bin")) and files.size(files.join(root, "c.bin")) == 3
  assert files.digest(files.join(root, "c.bin")) == hashlib.sha256(b"xyz").hexdigest()
  assert files.listdir(root) == ["a", "c.bin"] and files.listdir(root + "/none") == []
  files.remove(files.join(root, "a"))
  assert files.listdir(root) == ["c.bin"]
  files.remove(root)
  assert not fs.exists("/allscope-test-files")


def test_glob_matches_local_files_and_urls(tmp_path):
  for name in ("a.txt", "b.jsonl", "sub/c.txt"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("x")
  assert files.glob(str(tmp_path / "**/*.txt")) == [str(tmp_path / "a.txt"),
                                                    str(tmp_path / "sub/c.txt")]
  root = "memory://allscope-test-glob"
  for name in ("a.txt", "b.jsonl"):
    files.write_text(files.join(root, name), "x")
  found = files.glob(root + "/*.txt")
  assert found == ["memory:///allscope-test-glob/a.txt"]  # fsspec's own spelling of the URL
  assert files.read_bytes(found[0]) == b"x"
  files.remove(root)
