"""Publishes a release folder to a Hugging Face repo, a `gs://` prefix or a local folder.

Credentials come only from the environment (HF_TOKEN for the Hub; Google's application default
credentials for gs://) and are never logged, printed or written. The release is verified against
its manifest before anything is uploaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

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


def publish(release_dir: str | Path, to: str, *, dry_run: bool = False, private: bool = False,
            hf_api: Any = None, filesystem: Any = None) -> list[str]:
  """Copies the verified release to `to`; returns the destination of every file.

  `hf_api` (a `huggingface_hub.HfApi`) and `filesystem` (an fsspec filesystem for gs://) default
  to real clients built from the environment; tests pass their own at this boundary.
  """
  from allscope.release.load import load

  release_dir = Path(release_dir)
  target = parse_target(to)
  load(release_dir, verify=True)  # refuse to publish a corrupt or incomplete release
  files = release_files(release_dir)
  if target.scheme == "local":
    dest = Path(target.location).resolve()
    if dest == release_dir.resolve() or release_dir.resolve() in dest.parents:
      raise ValueError(f"publish target {dest} lies inside the release folder {release_dir}")
    destinations = [str(dest / f) for f in files]
  elif target.scheme == "hf":
    destinations = [f"hf://{target.location}/{f}" for f in files]
  else:
    destinations = [f"gs://{target.location}/{f}" for f in files]
  if dry_run:
    for d in destinations:
      print(f"[dry run] would upload {d}")
    return destinations

  if target.scheme == "local":
    for f, d in zip(files, destinations):
      Path(d).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(release_dir / f, d)
    load(dest, verify=True)  # the copy verifies against its own manifest
  elif target.scheme == "hf":
    api = hf_api
    if api is None:
      from huggingface_hub import HfApi
      token = os.environ.get("HF_TOKEN")
      if not token:
        raise RuntimeError("publishing to the Hugging Face Hub needs HF_TOKEN in the environment")
      api = HfApi(token=token)
    log.info("uploading %d files to hf://%s (token from HF_TOKEN)", len(files), target.location)
    api.create_repo(target.location, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(release_dir), repo_id=target.location, repo_type="model",
                      allow_patterns=files, commit_message="allscope release")
  else:
    fs = filesystem if filesystem is not None else _gcs()
    log.info("uploading %d files to gs://%s", len(files), target.location)
    for f, d in zip(files, destinations):
      fs.put_file(str(release_dir / f), d)
  return destinations


def _gcs() -> Any:
  try:
    import fsspec
    return fsspec.filesystem("gs")
  except (ImportError, ValueError) as e:
    raise RuntimeError("publishing to gs:// needs gcsfs: pip install gcsfs (credentials come "
                       "from GOOGLE_APPLICATION_CREDENTIALS or the metadata server)") from e
