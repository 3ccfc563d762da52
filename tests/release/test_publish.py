"""Publishing: a real local copy, dry runs, and the Hub / gs:// paths with the network faked only
at the uploader client (HfApi, an fsspec filesystem); tokens never reach logs or output."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

import fsspec
import pytest

import allscope.release as rel
from allscope.release import ReleaseConfig, ReleaseError
from allscope import files
from allscope.release.publish import PublishError, parse_target, release_files


@pytest.fixture
def release(tmp_path, make_dict, make_clt):
  return rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), model_card=False),
                           [make_dict("transcoder", layer=0), make_clt(n_layers=2)], tmp_path)


def test_local_publish_copies_and_verifies(release, tmp_path):
  dest = tmp_path / "published"
  written = rel.publish(release, str(dest))
  assert len(written) == 6  # manifest, 2 + 3 files in the two folders
  copy = rel.load(dest)
  assert len(copy.dictionaries) == 2
  assert (dest / "clt/width_32_l0_11/params_layer_1.safetensors").exists()


def test_dry_run_uploads_nothing(release, tmp_path, capsys):
  dest = tmp_path / "nowhere"
  planned = rel.publish(release, str(dest), dry_run=True)
  assert not dest.exists()
  assert f"[dry run] would upload {dest}/manifest.json" in capsys.readouterr().out
  assert any(p.endswith("params.safetensors") for p in planned)


def test_corrupt_release_is_not_published(release, tmp_path):
  (release / "transcoder/layer_0_width_64_l0_7/config.json").write_text("{}")
  with pytest.raises(ReleaseError, match="checksum mismatch"):
    rel.publish(release, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_local_target_inside_the_release_is_refused(release):
  with pytest.raises(ValueError, match="inside the release folder"):
    rel.publish(release, str(release / "sub"))


@pytest.mark.parametrize("target", ["hf://just-a-name", "hf://a/b/../c", "gs://", "s3://b/p",
                                    "hf://../x/y"])
def test_bad_targets_are_refused(target):
  with pytest.raises(ValueError, match="publish target"):
    parse_target(target)


class RecordingHfApi:
  """Stands in for huggingface_hub.HfApi at the network boundary: records the calls, keeps the
  uploaded bytes and answers get_paths_info from them as the Hub would (real RepoFile objects:
  sha256 for LFS files, the git blob id for the others)."""

  def __init__(self, token=None, corrupt=None):
    self.token = token
    self.calls = []
    self.repo: dict[str, bytes] = {}
    self.corrupt = corrupt  # a path whose upload arrives with one byte flipped

  def create_repo(self, repo_id, **kwargs):
    self.calls.append(("create_repo", repo_id, kwargs))

  def _put(self, path, data):
    if path == self.corrupt:
      data = bytes([data[0] ^ 1]) + data[1:]
    self.repo[path] = data

  def upload_folder(self, **kwargs):
    self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
    for pattern in kwargs.get("delete_patterns") or ():
      self.repo.pop(pattern, None)
    for f in kwargs["allow_patterns"]:
      self._put(f, (Path(kwargs["folder_path"]) / f).read_bytes())

  def upload_file(self, **kwargs):
    self.calls.append(("upload_file", kwargs["repo_id"], kwargs))
    self._put(kwargs["path_in_repo"], Path(kwargs["path_or_fileobj"]).read_bytes())

  def get_paths_info(self, repo_id, paths, **kwargs):
    from huggingface_hub.hf_api import RepoFile
    out = []
    for p in paths:
      if p in self.repo:
        data = self.repo[p]
        lfs = ({"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
               if p.endswith(".safetensors") else None)
        oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        out.append(RepoFile(path=p, size=len(data), oid=oid, lfs=lfs))
    return out


def test_hub_publish_takes_the_token_from_the_environment_and_never_logs_it(
    release, monkeypatch, capsys, caplog):
  secret = "hf_SECRETtoken1234567890"
  monkeypatch.setenv("HF_TOKEN", secret)
  import huggingface_hub
  made = []
  monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(RecordingHfApi(token)) or made[-1])
  caplog.set_level(logging.DEBUG)
  dest = rel.publish(release, "hf://allscope/test-release", private=True)
  api = made[0]
  assert api.token == secret
  assert api.calls[0] == ("create_repo", "allscope/test-release",
                          {"repo_type": "model", "private": True, "exist_ok": True})
  upload = api.calls[1][2]
  assert upload["folder_path"] == str(release) and "manifest.json" not in upload["allow_patterns"]
  assert api.calls[2][0] == "upload_file" and api.calls[2][2]["path_in_repo"] == "manifest.json"
  assert api.repo == {f: (release / f).read_bytes() for f in api.repo} and len(api.repo) == 6
  assert dest[0].startswith("hf://allscope/test-release/")
  out = capsys.readouterr()
  assert secret not in out.out + out.err + caplog.text
  assert not any(secret in p.read_text(errors="ignore") for p in release.rglob("*") if p.is_file())


def test_hub_publish_without_token_fails_clearly(release, monkeypatch):
  monkeypatch.delenv("HF_TOKEN", raising=False)
  with pytest.raises(RuntimeError, match="needs HF_TOKEN"):
    rel.publish(release, "hf://allscope/test-release")


def test_gs_publish_through_fsspec(release):
  fs = fsspec.filesystem("memory", skip_instance_cache=True)  # real fsspec, in place of gcsfs
  dest = rel.publish(release, "gs://bucket/releases/v1", filesystem=fs)
  assert sorted(fs.store) == sorted(dest) and len(dest) == 6
  assert fs.cat_file("gs://bucket/releases/v1/manifest.json") == (release / "manifest.json").read_bytes()


def test_gs_publish_without_gcsfs_says_what_to_install(release, monkeypatch):
  import builtins
  real_import = builtins.__import__
  def no_gcsfs(name, *args, **kwargs):
    if name == "gcsfs":
      raise ImportError("No module named 'gcsfs'")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_gcsfs)
  with pytest.raises(RuntimeError, match="pip install gcsfs"):
    rel.publish(release, "gs://bucket/releases/v1")


def test_hub_publish_reads_back_what_it_wrote(release):
  api = RecordingHfApi(corrupt="transcoder/layer_0_width_64_l0_7/params.safetensors")
  with pytest.raises(PublishError, match="params.safetensors differs from the release"):
    rel.publish(release, "hf://allscope/test-release", hf_api=api)
  api = RecordingHfApi(corrupt="transcoder/layer_0_width_64_l0_7/config.json")  # a git blob
  with pytest.raises(PublishError, match="config.json differs from the release"):
    rel.publish(release, "hf://allscope/test-release", hf_api=api)


def test_gs_publish_reads_back_what_it_wrote(release):
  fs = fsspec.filesystem("memory", skip_instance_cache=True)
  real_put = fs.put_file

  def truncating_put(lpath, rpath, **kwargs):  # an upload that lost its last byte
    real_put(lpath, rpath, **kwargs)
    if rpath.endswith("params_layer_1.safetensors"):
      fs.pipe_file(rpath, fs.cat_file(rpath)[:-1])

  fs.put_file = truncating_put
  with pytest.raises(PublishError, match="params_layer_1.safetensors has .* bytes, the release"):
    rel.publish(release, "gs://bucket/v1", filesystem=fs)


def test_local_publish_writes_the_manifest_last(release, tmp_path, monkeypatch):
  order = []
  real = files._open_for_write
  monkeypatch.setattr(files, "_open_for_write", lambda tmp: order.append(tmp) or real(tmp))
  rel.publish(release, str(tmp_path / "out"))
  assert len(order) == 6 and os.path.basename(order[-1]).startswith(".manifest.json.tmp-")


def test_publish_into_a_full_disk_leaves_no_truncated_file_and_no_manifest(release, tmp_path,
                                                                          monkeypatch):
  """The destination filesystem fills up partway through params.safetensors: every file under a
  final name is whole, nothing temporary is left, and manifest.json (written last) is absent."""
  params = "transcoder/layer_0_width_64_l0_7/params.safetensors"
  sizes = {f: (release / f).stat().st_size for f in release_files(release)}
  before = [f for f in sorted(sizes) if f < params and f != "manifest.json"]  # written earlier
  capacity = sum(sizes[f] for f in before) + 2 * sizes[params] // 3

  class FullDisk:
    used = 0

  class Filling:
    """A file object over the real one whose write raises ENOSPC once the disk is full."""

    def __init__(self, f):
      self._f = f

    def write(self, data):
      if FullDisk.used + len(data) > capacity:
        room = capacity - FullDisk.used
        self._f.write(bytes(data[:room]))
        FullDisk.used = capacity
        raise OSError(errno.ENOSPC, "No space left on device")
      FullDisk.used += len(data)
      return self._f.write(data)

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

  real = files._open_for_write
  monkeypatch.setattr(files, "_open_for_write", lambda tmp: Filling(real(tmp)))
  dest = tmp_path / "full"
  with pytest.raises(OSError) as info:
    rel.publish(release, str(dest))
  assert info.value.errno == errno.ENOSPC
  written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
  assert written and "manifest.json" not in written
  assert not [f for f in written if ".tmp-" in f]
  assert params not in written and set(before) <= set(written)
  for f in written:  # whatever stands under a final name is complete
    assert (dest / f).read_bytes() == (release / f).read_bytes(), f
  with pytest.raises(ReleaseError):
    rel.load(dest)  # no manifest: clients see no release rather than a truncated one


def test_published_files_are_readable_by_others(release, tmp_path):
  for p in release.rglob("*"):  # a release written before the fix (mkstemp's 0600)
    if p.is_file():
      p.chmod(0o600)
  old = os.umask(0o022)
  try:
    rel.publish(release, str(tmp_path / "shared"))
  finally:
    os.umask(old)
  modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").rglob("*") if p.is_file()}
  assert modes == {0o644}


def test_publish_over_an_old_copy_replaces_its_manifest_last(release, tmp_path, monkeypatch):
  dest = tmp_path / "out"
  rel.publish(release, str(dest))
  seen = []
  real = files._open_for_write

  def watch(tmp):  # while each file is written, is the old manifest still there?
    seen.append((dest / "manifest.json").exists())
    return real(tmp)

  monkeypatch.setattr(files, "_open_for_write", watch)
  rel.publish(release, str(dest))
  assert seen == [False] * 6
  assert rel.load(dest, verify=True)


def test_a_written_release_is_readable_by_others(tmp_path, make_dict, make_clt):
  old = os.umask(0o022)
  try:
    root = rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel")),
                             [make_dict("transcoder", layer=0), make_clt(n_layers=2)], tmp_path)
  finally:
    os.umask(old)
  modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode)
           for p in root.rglob("*") if p.is_file()}
  assert "README.md" in modes and "manifest.json" in modes
  assert set(modes.values()) == {0o644}, modes
