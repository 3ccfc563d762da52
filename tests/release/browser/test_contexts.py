"""Contexts come from the store's index: rows back to (sequence, position), windows of tokens."""

from __future__ import annotations

import numpy as np

from allscope.release.browser import contexts


def _window(seq, pos, before, after, bos):
  out = []
  for p in range(pos - before, pos + after + 1):
    out.append(bos if p == 0 else seq[p - 1] if 1 <= p <= len(seq) else contexts.MISSING)
  return out


def test_rows_locate_to_their_index_entries(text_store):
  store, truth = text_store
  rows = np.random.default_rng(0).choice(len(truth["index"]), 25, replace=False)
  np.testing.assert_array_equal(contexts.locate(store, rows), truth["index"][rows])


def test_windows_rebuild_the_packed_text(text_store, tokenizer):
  store, truth = text_store
  seqs = truth["sequences"]
  rng = np.random.default_rng(1)
  which = rng.integers(0, len(seqs), 40)
  pos = np.array([rng.integers(1, len(seqs[s]) + 1) for s in which])
  pos[:3] = [1, len(seqs[which[1]]), 2]  # sequence edges: neighbours must not leak in
  got, shards, rows = contexts.windows(store, which, pos, 5, 3, tokenizer.bos_id)
  want = [_window(seqs[s], p, 5, 3, tokenizer.bos_id) for s, p in zip(which, pos)]
  np.testing.assert_array_equal(got, np.array(want))
  # each stored window token is located at its own row of its shard's files
  stored = shards != contexts.MISSING
  assert stored.sum() > 200 and np.all(rows[~stored] == contexts.MISSING)
  files = {s["shard"]: contexts.read_index(store, s) for s in store.manifest["shards"]}
  for shard, row, token in zip(shards[stored], rows[stored], got[stored]):
    assert files[int(shard)][row]["token"] == token


def test_token_texts_keep_spaces_and_markup_as_plain_text(tokenizer):
  ids = tokenizer.encode("the <script>")
  texts = contexts.token_texts(tokenizer, ids)
  assert "".join(texts[i] for i in ids) == "the <script>"
  assert tokenizer.piece_text(tokenizer.encode(" lighthouse")[0]) == " lighthouse"
  assert tokenizer.piece_text(tokenizer.encode("\n")[0]) == "\n"
