"""Publishes a release folder to a Hugging Face repo, a `gs://` prefix or a local folder.

Credentials come only from the environment (HF_TOKEN for the Hub; Google's application default
credentials for gs://) and are never logged, printed or written. The release is verified against
its manifest before anything is uploaded; the manifest is uploaded last, and every published file
is read back (size and sha256) afterwards. Published files get modes from the umask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from allscope import files
from allscope.release import export

log = logging.getLogger(__name__)

_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_GS = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}(/[A-Za-z0-9._/-]*)?$")


@dataclasses.dataclass(frozen=True)
class Target:
  scheme: str  # "hf", "gs" or "local"
  location: str  # repo id, bucket/prefix, or a folder


def parse_target(to: str) -> Target:
  if to.startswith("hf://"):
    repo = to[len("hf://"):].strip("/")
    if not _HF_REPO.match(repo) or ".." in repo:
      raise ValueError(f"publish target {to!r}: expected hf://<org>/<repo>")
    return Target("hf", repo)
  if to.startswith("gs://"):
    rest = to[len("gs://"):].strip("/")
    if not _GS.match(rest) or ".." in rest.split("/"):
      raise ValueError(f"publish target {to!r}: expected gs://<bucket>/<prefix>")
    return Target("gs", rest)
  if "://" in to:
    raise ValueError(f"publish target {to!r}: use hf://org/repo, gs://bucket/prefix or a local folder")
  if not to:
    raise ValueError("publish target is empty")
  return Target("local", to)


def release_files(release_dir: Path) -> list[str]:
  """Every file of the release, relative and sorted (temporary and hidden files left out)."""
  files = []
  for path in sorted(release_dir.rglob("*")):
    rel = path.relative_to(release_dir)
    if path.is_file() and not any(part.startswith(".") for part in rel.parts):
      if path.is_symlink():
        raise ValueError(f"{path}: symlinks are not published; copy the file into the release")
      files.append(rel.as_posix())
  return files


class PublishError(RuntimeError):
  """A published copy that does not read back as written; the message names the file and the fix."""


def publish(release_dir: str | Path, to: str, *, dry_run: bool = False, private: bool = False,
            hf_api: Any = None, filesystem: Any = None) -> list[str]:
  """Copies the verified release to `to`, manifest.json last, then reads back what it wrote
  (size and sha256 of every file); returns the destination of every file.

  Until the manifest lands the copy is incomplete, and no file stands under its final name
  unless all its bytes do (a full disk leaves the earlier files and no manifest). A manifest
  already at the destination is removed first. `hf_api` (a `huggingface_hub.HfApi`) and
  `filesystem` (an fsspec filesystem for gs://) default to real clients built from the
  environment; tests pass their own at this boundary.
  """
  from allscope.release.load import load

  release_dir = Path(release_dir)
  target = parse_target(to)
  load(release_dir, verify=True)  # refuse to publish a corrupt or incomplete release
  names = release_files(release_dir)
  names = [f for f in names if f != export.MANIFEST_FILE] + [export.MANIFEST_FILE]
  if target.scheme == "local":
    dest = Path(target.location).resolve()
    if dest == release_dir.resolve() or release_dir.resolve() in dest.parents:
      raise ValueError(f"publish target {dest} lies inside the release folder {release_dir}")
    destinations = [str(dest / f) for f in names]
  else:
    destinations = [f"{target.scheme}://{target.location}/{f}" for f in names]
  if dry_run:
    for d in destinations:
      print(f"[dry run] would upload {d}")
    return destinations
  expected = {f: (files.size(release_dir / f), files.digest(release_dir / f)) for f in names}

  if target.scheme == "local":
    files.remove(destinations[-1])  # the old manifest: the copy is incomplete until it lands
    for f, d in zip(names, destinations):
      files.copy(release_dir / f, d)
    _check(to, names, expected, lambda f: _read_back(files.join(str(dest), f)))
  elif target.scheme == "hf":
    api = hf_api
    if api is None:
      from huggingface_hub import HfApi
      token = os.environ.get("HF_TOKEN")
      if not token:
        raise RuntimeError("publishing to the Hugging Face Hub needs HF_TOKEN in the environment")
      api = HfApi(token=token)
    log.info("uploading %d files to hf://%s (token from HF_TOKEN)", len(names), target.location)
    repo = target.location
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    # Two commits, each atomic on the Hub: everything but the manifest (dropping an old one),
    # then the manifest.
    api.upload_folder(folder_path=str(release_dir), repo_id=repo, repo_type="model",
                      allow_patterns=names[:-1], delete_patterns=[export.MANIFEST_FILE],
                      commit_message="allscope release: files")
    api.upload_file(path_or_fileobj=str(release_dir / export.MANIFEST_FILE),
                    path_in_repo=export.MANIFEST_FILE, repo_id=repo, repo_type="model",
                    commit_message="allscope release: manifest")
    found = {i.path: i for i in api.get_paths_info(repo, names, repo_type="model")}

    def hub(f: str) -> tuple[int, str] | None:  # the Hub reports sha256 for LFS files only
      info = found.get(f)
      return None if info is None else (info.size, info.lfs.sha256 if info.lfs else info.blob_id)

    def local(f: str) -> tuple[int, str]:
      size, digest = expected[f]
      lfs = f in found and found[f].lfs is not None
      return size, digest if lfs else files.git_blob_sha1(release_dir / f)

    _check(to, names, {f: local(f) for f in names}, hub)
  else:
    fs = filesystem if filesystem is not None else files.filesystem(to)[0]
    log.info("uploading %d files to gs://%s", len(names), target.location)
    if fs.exists(destinations[-1]):
      fs.rm(destinations[-1])
    for f, d in zip(names, destinations):
      fs.put_file(str(release_dir / f), d)  # one object each: an object store has no partial ones
    _check(to, names, expected, lambda f: _read_back_fs(fs, f"gs://{target.location}/{f}"))
  return destinations


def _read_back(path: str) -> tuple[int, str] | None:
  return (files.size(path), files.digest(path)) if files.exists(path) else None


def _read_back_fs(fs: Any, path: str) -> tuple[int, str] | None:
  if not fs.exists(path):
    return None
  digest = hashlib.sha256()
  with fs.open(path, "rb") as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return int(fs.size(path)), digest.hexdigest()


def _check(to: str, names: list[str], expected: dict[str, tuple[int, str]], read_back) -> None:
  """Compares every published file with the release; raises naming the first that differs."""
  for f in names:
    got = read_back(f)
    if got != expected[f]:
      what = "is missing" if got is None else (
          f"has {got[0]} bytes, the release {expected[f][0]}" if got[0] != expected[f][0]
          else "differs from the release (checksum)")
      raise PublishError(f"published {to}/{f} {what}; the copy is incomplete, publish again "
                         "(the manifest is written last, so clients see no half release)")
