"""A loopback stand-in for the Hugging Face Hub's file endpoint, serving one local folder.

SAELens' Gemma 3 loader reads Gemma Scope 2 releases only from the Hub: `hf_hub_download` for
config.json and params, plus HTTP range requests for the safetensors header. Pointing
HF_ENDPOINT at this server lets the real client code run unchanged with no network: it answers
`GET|HEAD /<org>/<repo>/resolve/<revision>/<path>` with the headers huggingface_hub reads
(X-Repo-Commit, ETag, Content-Length, Range) and 404 + `X-Error-Code: EntryNotFound` otherwise.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

COMMIT = "0" * 40


class _Handler(http.server.BaseHTTPRequestHandler):
  root: Path
  repo: str
  requests: list

  def log_message(self, *args):  # keep pytest output clean
    pass

  def _resolve(self) -> Path | None:
    prefix = f"/{self.repo}/resolve/"
    path = self.path.split("?", 1)[0]
    if not path.startswith(prefix):
      return None
    rel = path[len(prefix):].split("/", 1)
    if len(rel) != 2:
      return None
    file = (self.root / rel[1]).resolve()
    if self.root not in file.parents or not file.is_file():
      return None
    return file

  def _serve(self, body: bool) -> None:
    self.requests.append((self.command, self.path, self.headers.get("Range")))
    file = self._resolve()
    if file is None:
      self.send_response(404)
      self.send_header("X-Error-Code", "EntryNotFound")
      self.send_header("X-Error-Message", "Entry not found")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    data = file.read_bytes()
    status, start, end = 200, 0, len(data) - 1
    ranged = self.headers.get("Range")
    if ranged and ranged.startswith("bytes="):
      lo, _, hi = ranged[len("bytes="):].partition("-")
      start, end = int(lo or 0), min(int(hi) if hi else len(data) - 1, len(data) - 1)
      status = 206
    chunk = data[start:end + 1]
    self.send_response(status)
    self.send_header("Content-Length", str(len(chunk)))
    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
    self.send_header("X-Repo-Commit", COMMIT)
    self.send_header("Accept-Ranges", "bytes")
    if status == 206:
      self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
    self.end_headers()
    if body:
      self.wfile.write(chunk)

  def do_HEAD(self):
    self._serve(body=False)

  def do_GET(self):
    self._serve(body=True)


class LocalHub:
  """`with LocalHub(folder, "org/repo") as hub:` serves folder at hub.endpoint on 127.0.0.1."""

  def __init__(self, root: str | Path, repo: str):
    handler = type("Handler", (_Handler,), {"root": Path(root).resolve(), "repo": repo,
                                            "requests": []})
    self.requests = handler.requests
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self) -> LocalHub:
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.server.shutdown()
    self.server.server_close()
    self.thread.join(timeout=5)
