"""Corpus units and packing: BOS first, EOS between documents, PAD only at a unit's end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allscope.pipelines import corpus
from allscope.pipelines.config import CorpusConfig

BOS, EOS, PAD = 2, 1, 0


def test_pack_concatenates_documents_and_cuts_with_bos_first():
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 100, n)) for n in (5, 0, 11, 3)]
  seqs = list(corpus.pack(docs, 6, BOS, EOS, PAD))
  stream = [t for d in docs if d for t in d + [EOS]]  # 22 tokens
  assert [n for _, n in seqs] == [6, 6, 6, 6, 3]
  assert all(s[0] == BOS for s, _ in seqs)
  body = [t for s, n in seqs for t in s[1:n]]
  assert body == stream
  last, n = seqs[-1]
  assert list(last[n:]) == [PAD] * (6 - n)


def test_builtin_corpus_is_pydoc_topics():
  from pydoc_data import topics
  cfg = CorpusConfig(kind="builtin", docs_per_unit=100)
  units = corpus.units(cfg)
  texts = [t for u in units for t in corpus.documents(cfg, u)]
  assert texts == [topics.topics[k] for k in sorted(topics.topics)]


def test_files_glob_reads_text_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_text("alpha")
  (tmp_path / "b.txt").write_text("beta")
  (tmp_path / "c.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n\n" +
                                    json.dumps({"body": "delta"}) + "\n")
  cfg = CorpusConfig(kind="files", path=str(tmp_path / "*"), text_field="body", docs_per_unit=1)
  units = corpus.units(cfg)
  assert [t for u in units for t in corpus.documents(cfg, u)] == ["alpha", "beta", "gamma",
                                                                 "delta"]


def test_missing_corpus_and_bad_jsonl_are_named(tmp_path):
  with pytest.raises(corpus.CorpusError, match="matches no files"):
    corpus.units(CorpusConfig(kind="files", path=str(tmp_path / "*.txt")))
  (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
  cfg = CorpusConfig(kind="files", path=str(tmp_path / "bad.jsonl"))
  with pytest.raises(corpus.CorpusError, match=r"bad.jsonl:1: .*'text'"):
    list(corpus.documents(cfg, corpus.units(cfg)[0]))
  with pytest.raises(corpus.CorpusError, match="TFDS cannot open"):
    corpus.units(CorpusConfig(kind="tfds", path="no_such_dataset", data_dir=str(tmp_path)))


@pytest.mark.parametrize("name,data,message", [
    ("latin1.txt", "caf\xe9".encode("latin-1"), r"latin1.txt is not UTF-8 text"),
    ("blob.txt", b"\x00\x01\x02abc", r"blob.txt holds NUL bytes: it looks binary"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl is not UTF-8"),
])
def test_binary_or_non_utf8_corpus_files_are_named(tmp_path, name, data, message):
  (tmp_path / name).write_bytes(data)
  cfg = CorpusConfig(kind="files", path=str(tmp_path / name))
  with pytest.raises(corpus.CorpusError, match=message):
    list(corpus.documents(cfg, corpus.units(cfg)[0]))
