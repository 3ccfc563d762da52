"""The browser's pass over the store against a float64 numpy reference on the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from allscope.release.browser import BrowseConfig, scan, units_of
from allscope.release.load import load
from tests.release.reference import ref_encode

from .helpers import LAYERS, R

CFG = BrowseConfig(batch_size=12, top_n=5, bins_per_decade=4, min_log10=-2.0, max_log10=2.0)


def _reference(unit, truth, rows, cfg):
  x = truth[unit.site][rows, LAYERS.index(unit.layer)]
  f = ref_encode(unit.params, x, unit.architecture, unit.k)
  on = f > 0
  bins = np.clip(np.floor((np.log10(np.where(on, f, 1.0)) - cfg.min_log10) * cfg.bins_per_decade),
                 0, cfg.n_bins - 1).astype(int)
  hist = np.zeros((f.shape[1], cfg.n_bins), np.int64)
  for j in range(f.shape[1]):
    np.add.at(hist[j], bins[on[:, j], j], 1)
  return f, on.sum(0), hist


@pytest.mark.parametrize("skip,max_tokens", [(0, 0), (0, 50), (21, 40)])
def test_pass_matches_float64_reference(text_store, release_dir, skip, max_tokens):
  store, truth = text_store
  root, _ = release_dir
  rel = load(root)
  units, skipped = units_of(rel.manifest["dictionaries"], rel.dictionaries)
  assert [u.key.split("/")[0] for u in units] == ["transcoder", "mlp_out", "clt", "clt"]
  assert not skipped
  cfg = BrowseConfig(**{**CFG.__dict__, "max_tokens": max_tokens, "skip_tokens": skip})
  stats, timing = scan(units, store, cfg, progress=False)
  first = skip // R * R  # whole records
  end = len(truth["index"]) if not max_tokens else first + -(-max_tokens // R) * R
  rows = np.arange(first, end)  # global pass row ids: record * R + slot
  assert timing["tokens"] == len(rows) and timing["tokens_per_s"] > 0
  for u, s in zip(units, stats):
    f, fired, hist = _reference(u, truth, rows, cfg)
    np.testing.assert_array_equal(s.fired, fired, err_msg=u.key)
    np.testing.assert_allclose(s.act_sum, f.sum(0), rtol=1e-5, atol=1e-5, err_msg=u.key)
    np.testing.assert_array_equal(s.hist, hist, err_msg=u.key)
    assert s.hist.sum() == fired.sum()
    for j in range(u.width):  # the bounded heap holds exactly the best rows of the whole pass
      want = np.argsort(-f[:, j], kind="stable")[:cfg.top_n]
      want = want[f[want, j] > 0]
      got = s.top_rows[j][s.top_values[j] > 0]
      assert sorted(got.tolist()) == sorted(rows[want].tolist()), (u.key, j)
      np.testing.assert_allclose(s.top_values[j][:len(want)], f[want, j], rtol=1e-5)
  assert stats[1].fired[5] == 0 and stats[1].frequency[6] == 1.0  # the dead and the dense latent


def test_planted_latent_peaks_on_its_token(text_store, release_dir, tokenizer):
  store, truth = text_store
  rel = load(release_dir[0])
  units, _ = units_of(rel.manifest["dictionaries"], rel.dictionaries)
  stats, _ = scan(units, store, CFG, progress=False)
  for u, s in zip(units, stats):
    if u.key.startswith("mlp_out"):
      continue
    rows = s.top_rows[0][s.top_values[0] > 0]
    assert len(rows) > 0
    assert {tokenizer.piece_text(int(t)) for t in truth["index"]["token"][rows]} == {"script"}


def test_bad_stores_are_refused_before_the_pass(text_store, release_dir):
  store, _ = text_store
  rel = load(release_dir[0])
  units, _ = units_of(rel.manifest["dictionaries"], rel.dictionaries)
  moved = units[0].__class__(**{**units[0].__dict__, "layer": 7})
  with pytest.raises(ValueError, match=r"reads mlp_in at layer 7, but the store .* holds sites"):
    scan([moved], store, CFG, progress=False)
  narrow = units[0].__class__(**{**units[0].__dict__,
                                 "params": {**units[0].params, "w_enc": np.zeros((8, 40), np.float32)}})
  with pytest.raises(ValueError, match="w_enc has d_in 8 but mlp_in in the store has width 24"):
    scan([narrow], store, CFG, progress=False)
  with pytest.raises(ValueError, match="browse.skip_tokens=100000 leaves none to browse"):
    scan(units, store, BrowseConfig(**{**CFG.__dict__, "skip_tokens": 100000}), progress=False)


def test_every_window_token_gets_its_activation(text_store, release_dir, tokenizer):
  """Per-token highlighting: the latent's activation on each token around each top context,
  against the float64 reference on the stored rows (partial records included)."""
  from allscope.release.browser.build import _contexts, _window_acts

  store, truth = text_store
  rel = load(release_dir[0])
  units, _ = units_of(rel.manifest["dictionaries"], rel.dictionaries)
  cfg = BrowseConfig(**{**CFG.__dict__, "before": 4, "after": 2})
  stats, _ = scan(units, store, cfg, progress=False)
  ctx = _contexts(stats, store, tokenizer, cfg, "checksum")
  checked = 0
  for u, s in zip(units, stats):
    acts = _window_acts(u, s, ctx, store, "checksum")
    j = LAYERS.index(u.layer)
    for f in range(u.width):
      for rank in np.flatnonzero(s.top_values[f] > 0):
        seq, pos = ctx.seqpos[ctx.at(s.top_rows[f, rank])]
        for o, got in zip(range(-4, 3), acts[f, rank]):
          row = truth["by_position"].get((seq, pos + o))
          if row is None:
            assert np.isnan(got)
            continue
          want = ref_encode(u.params, row[u.site][j][None], u.architecture, u.k)[0, f]
          assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (u.key, f, rank, o, got, want)
          checked += 1
  assert checked > 500
