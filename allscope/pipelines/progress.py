"""A progress bar for the harvest, fed by finished shards' receipts (so it works across worker
processes on one host)."""

from __future__ import annotations

import threading

from allscope import files
from allscope.pipelines import store
from allscope.pipelines.planning import Plan


class Progress:
  """A tqdm bar fed by finished-shard receipts (works across worker processes)."""

  def __init__(self, p: Plan):
    self._root = p.output_dir
    self._total = p.num_sequences * (p.cfg.context_length - 1)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _rows(self, seen: dict[str, int]) -> int:
    for name in files.listdir(files.join(self._root, store.RECEIPTS)):
      if name.endswith(".safetensors") and name not in seen:
        found = store.read_receipt(self._root, int(name[6:11]))
        seen[name] = found[0]["rows"] if found else 0
    return sum(seen.values())

  def _run(self):
    from tqdm import tqdm
    seen: dict[str, int] = {}
    bar = tqdm(total=self._total, initial=self._rows(seen), unit="tok", unit_scale=True,
               desc="harvest", smoothing=0.1)
    while not self._stop.wait(1.0):
      bar.update(self._rows(seen) - bar.n)
    bar.update(self._rows(seen) - bar.n)
    bar.close()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
