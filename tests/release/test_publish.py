"""Publishing: a real local copy, dry runs, and the Hub / gs:// paths with the network faked only
at the uploader client (HfApi, an fsspec filesystem); tokens never reach logs or output."""

from __future__ import annotations

import logging

import fsspec
import pytest

import allscope.release as rel
from allscope.release import ReleaseConfig, ReleaseError
from allscope.release.publish import parse_target


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
  """Stands in for huggingface_hub.HfApi at the network boundary: records the calls."""

  def __init__(self, token=None):
    self.token = token
    self.calls = []

  def create_repo(self, repo_id, **kwargs):
    self.calls.append(("create_repo", repo_id, kwargs))

  def upload_folder(self, **kwargs):
    self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


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
  assert upload["folder_path"] == str(release) and "manifest.json" in upload["allow_patterns"]
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
