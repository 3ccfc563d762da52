"""Files, local or remote: one path layer (fsspec), sha256 digests and atomic, readable writes.

Every stage writes through `atomic_write`: the bytes go to a temporary name beside the final one
(`.<name>.tmp-<hex>`, hidden, so listings and releases skip it), are fsynced, and are renamed
into place, so a name that exists is complete. The temporary file is created with mode 0o666 and
the kernel applies the umask; a writer that replaces it (safetensors writes 0600) gets that mode
back before the rename (mkstemp's 0600 left releases unreadable to colleagues). Remote
destinations (`gs://...`, any fsspec URL) are written to local scratch and uploaded in one put:
object stores have no partial objects.

This module is a leaf: it imports nothing from allscope, so every stage may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
_TMP = ".tmp-"


# ---------------------------------------------------------------------------------------------
# Paths. Local paths and URLs (gs://..., memory://...) are both joined with '/'.

def is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def join(*parts: str | os.PathLike) -> str:
  parts = tuple(str(p) for p in parts)
  return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def filesystem(path: str) -> tuple[Any, str]:
  """The fsspec filesystem of a URL and the path inside it (gs:// needs gcsfs installed)."""
  import fsspec
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    raise RuntimeError(f"cannot open {path}: {e}; for gs:// install gcsfs (pip install gcsfs); "
                       "credentials come from the environment") from e


def exists(path: str | os.PathLike) -> bool:
  if is_remote(path):
    fs, inner = filesystem(str(path))
    return fs.exists(inner)
  return os.path.exists(path)


def size(path: str | os.PathLike) -> int:
  if is_remote(path):
    fs, inner = filesystem(str(path))
    return int(fs.size(inner))
  return os.path.getsize(path)


@contextlib.contextmanager
def open_read(path: str | os.PathLike) -> Iterator[IO[bytes]]:
  if is_remote(path):
    fs, inner = filesystem(str(path))
    with fs.open(inner, "rb") as f:
      yield f
  else:
    with open(path, "rb") as f:
      yield f


def read_bytes(path: str | os.PathLike) -> bytes:
  with open_read(path) as f:
    return f.read()


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(read_bytes(path))


def listdir(path: str | os.PathLike) -> list[str]:
  """Names directly under a folder ([] when it does not exist)."""
  if is_remote(path):
    fs, inner = filesystem(str(path))
    if not fs.exists(inner):
      return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def glob(pattern: str) -> list[str]:
  """Files matching a glob (`**` recurses), sorted; URLs come back as URLs."""
  if is_remote(pattern):
    fs, inner = filesystem(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(inner) if fs.isfile(p))
  import glob as glob_lib
  return sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                if os.path.isfile(p))


def remove(path: str | os.PathLike) -> None:
  """Deletes a file or a folder tree; a missing path is fine."""
  if is_remote(path):
    fs, inner = filesystem(str(path))
    if fs.exists(inner):
      fs.rm(inner, recursive=True)
  elif os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def is_temporary(name: str) -> bool:
  """Whether a file name is one of `atomic_write`'s temporary names."""
  return name.startswith(".") and _TMP in name


# ---------------------------------------------------------------------------------------------
# Digests.

def digest(path: str | os.PathLike) -> str:
  """sha256 of a file's bytes, as hex."""
  with open_read(path) as f:
    if hasattr(f, "readinto"):
      return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()  # some remote file objects only read()
    while block := f.read(1 << 24):
      h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: str | os.PathLike) -> str:
  """Git's object id of a file (what the Hugging Face Hub reports for non-LFS files)."""
  h = hashlib.sha1(f"blob {size(path)}\0".encode())
  with open_read(path) as f:
    while block := f.read(1 << 24):
      h.update(block)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic writes.

def _temporary_name(path: str) -> str:
  """Where a local file is written before its rename (beside it: the rename stays atomic)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}{_TMP}{uuid.uuid4().hex}")


def _new_file(path: str) -> int:
  """Creates an empty file with mode 0o666 minus the umask; returns that mode."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
  try:
    return stat.S_IMODE(os.fstat(fd).st_mode)
  finally:
    os.close(fd)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _open_for_write(path: str) -> IO[bytes]:
  """The file object `atomic_open` writes through (the filesystem boundary tests fault)."""
  return open(path, "r+b")


def atomic_write(path: str | os.PathLike, write: Callable[[str], T]) -> T:
  """Calls `write(tmp)` to fill a local temporary file, then puts it at `path` atomically.

  Returns what `write` returned. On any failure (a full disk included) the temporary file is
  removed and nothing new sits under `path`.
  """
  with _Deferred(path) as deferred:
    deferred.begin()
    out = write(deferred.tmp)
    deferred.commit()
  return out


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
  """A binary file object whose bytes appear at `path` only when the block ends cleanly."""
  with _Deferred(path) as deferred:
    deferred.begin()
    with _open_for_write(deferred.tmp) as f:
      yield f
    deferred.commit()


class _Deferred:
  """A temporary file (`begin`) that `commit` puts under its final name; leaving the `with`
  block removes whatever was not committed."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self.tmp = ""
    self._scratch = ""
    self._mode = 0

  def begin(self) -> None:
    if is_remote(self.path):
      self._scratch = tempfile.mkdtemp(prefix="allscope-")
      self.tmp = os.path.join(self._scratch, posixpath.basename(self.path))
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self.tmp = _temporary_name(self.path)
    self._mode = _new_file(self.tmp)

  def commit(self) -> None:
    if is_remote(self.path):
      fs, inner = filesystem(self.path)
      fs.put_file(self.tmp, inner)
      return
    if stat.S_IMODE(os.stat(self.tmp).st_mode) != self._mode:
      os.chmod(self.tmp, self._mode)  # a writer that replaced the file (safetensors: 0600)
    _fsync(self.tmp)
    os.replace(self.tmp, self.path)
    with contextlib.suppress(OSError):
      _fsync(os.path.dirname(os.path.abspath(self.path)))

  def __enter__(self) -> _Deferred:
    return self

  def __exit__(self, *exc) -> None:
    if self._scratch:
      shutil.rmtree(self._scratch, ignore_errors=True)
    elif self.tmp:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path) as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def copy(src: str | os.PathLike, dest: str | os.PathLike, chunk: int = 1 << 24) -> None:
  """Copies a file's bytes (not its mode: the copy's comes from the umask) atomically."""
  with open_read(src) as f, atomic_open(dest) as out:
    shutil.copyfileobj(f, out, chunk)
