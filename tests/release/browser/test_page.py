"""The written browser in a real headless Chromium (Debian `chromium` + `chromium-driver`),
opened from disk: latents, contexts, lists and search work, corpus markup stays text, and the
console stays free of errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from allscope.release.browser import BrowseConfig, Unembedding, build
from allscope.release.browser.build import read_script

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")
CFG = BrowseConfig(batch_size=12, top_n=5, block_size=16, logit_tokens=4, neuronpedia=True)


@pytest.fixture(scope="module")
def browser_dir(text_store, release_dir, tokenizer):
  store, _ = text_store
  root, _ = release_dir
  rng = np.random.default_rng(5)
  unembed = Unembedding(rng.normal(0, 1, (2000, 24)).astype(np.float32), np.ones(24, np.float32))
  out = build(root, store, tokenizer, unembed, CFG, progress=False)
  return out


@pytest.fixture(scope="module")
def driver():
  if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("ALLSCOPE_REQUIRE_CLIENTS"):
      pytest.fail(f"{CHROMIUM} or {DRIVER} missing: apt-get install -y chromium chromium-driver")
    pytest.skip("chromium / chromium-driver not installed")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  profile = tempfile.mkdtemp(prefix="allscope-chromium-")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in FLAGS + (f"--user-data-dir={profile}",):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  d = webdriver.Chrome(service=Service(DRIVER), options=options)
  yield d
  d.quit()
  shutil.rmtree(profile, ignore_errors=True)


def _open(driver, url_or_none, ready):
  from selenium.webdriver.support.ui import WebDriverWait
  if url_or_none:
    driver.get(url_or_none)
  WebDriverWait(driver, 30).until(
      lambda d: d.execute_script("return document.body.dataset.ready") == ready)


def _errors(driver):
  return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_browser_files_are_written(browser_dir):
  path = browser_dir["path"]
  assert (path / "index.html").exists() and (path / "data" / "catalog.js").exists()
  assert sorted(p.name for p in (path / "data").iterdir()) == ["catalog.js", "u000", "u001",
                                                               "u002", "u003"]
  assert len(list((path / "data" / "u000").glob("block_*.js"))) == 3  # 40 latents / 16
  assert not list(path.parent.glob(".browser.*"))  # no temporary folder left behind
  assert browser_dir["units"] == 4 and browser_dir["tokens"] > 0
  for file in (path / "data").rglob("*.js"):  # base64 payloads: no markup can reach the page
    assert "<" not in file.read_text()
  key, block = read_script(path / "data" / "u000" / "block_0.js")
  latent = block["latents"][0]
  assert key == "u000/block_0" and latent["i"] == 0 and len(latent["contexts"]) == CFG.top_n
  for c in latent["contexts"]:
    assert len(c["toks"]) == CFG.before + 1 + CFG.after
    assert block["texts"][str(c["toks"][CFG.before])] == "script"
    assert c["acts"][CFG.before] == c["act"] > 0
  assert any(a is None for c in latent["contexts"] for a in c["acts"])  # BOS / outside
  assert [v for _, v in latent["promoted"]] == sorted((v for _, v in latent["promoted"]), reverse=True)


def test_neuronpedia_batches_hold_the_same_features(browser_dir):
  path = browser_dir["path"]
  files = sorted((path / "neuronpedia" / "u000").glob("batch-*.json"))
  assert [f.name for f in files] == ["batch-0.json", "batch-1.json", "batch-2.json"]
  batch = json.loads(files[0].read_text())
  assert batch["layer"] == 1 and batch["sae_set"].startswith("transcoder/")
  assert batch["model_id"] == "gemma-3-270m" and len(batch["features"]) == CFG.block_size
  _, block = read_script(path / "data" / "u000" / "block_0.js")
  feat, latent = batch["features"][0], block["latents"][0]
  assert feat["feature_index"] == 0 and feat["frac_nonzero"] == latent["freq"]
  assert feat["pos_values"] == [v for _, v in latent["promoted"]]
  assert len(feat["freq_hist_data_bar_values"]) == len(feat["freq_hist_data_bar_heights"])
  for act, c in zip(feat["activations"], latent["contexts"]):
    assert act["tokens"][act["qualifying_token_index"]] == "script"
    assert act["values"][act["qualifying_token_index"]] == c["act"]
    assert len(act["tokens"]) == len(act["values"]) == sum(t >= 0 for t in c["toks"])


def test_latent_page_shows_contexts_from_disk(browser_dir, driver, tmp_path):
  from selenium.webdriver.common.by import By

  index = browser_dir["path"] / "index.html"
  _open(driver, index.as_uri() + "#u000/0", "u000/0")
  assert driver.find_element(By.ID, "latent-title").text.endswith("latent 0")
  rows = driver.find_elements(By.CSS_SELECTOR, "#contexts .context")
  assert len(rows) == CFG.top_n
  for row in rows:  # the planted latent peaks on "script", shown as text inside its context
    assert row.find_element(By.CSS_SELECTOR, ".peak").text == "script"
  text = "\n".join(r.text for r in rows)
  assert "<script>" in text or "</script>" in text
  # corpus markup stayed text: no element came from it, no dialog opened
  assert driver.find_elements(By.CSS_SELECTOR, "#view img, #view script") == []
  sources = driver.execute_script(
      "return [...document.scripts].map(s => s.getAttribute('src'))")
  # lazy: the page, the catalog, this dictionary's summary and one block of latents
  assert sorted(sources) == ["app.js", "data/catalog.js", "data/u000/block_0.js",
                             "data/u000/summary.js"]
  assert len(driver.find_elements(By.CSS_SELECTOR, ".promoted tr")) == CFG.logit_tokens
  assert driver.find_element(By.CSS_SELECTOR, ".hist").find_elements(By.TAG_NAME, "div")
  driver.save_screenshot(str(tmp_path / "latent.png"))
  assert (tmp_path / "latent.png").stat().st_size > 10_000
  assert _errors(driver) == []


def test_navigation_lists_and_search(browser_dir, driver):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select

  _open(driver, (browser_dir["path"] / "index.html").as_uri() + "#u000/15", "u000/15")
  driver.find_element(By.ID, "next").click()
  _open(driver, None, "u000/16")  # the next block, loaded on demand
  Select(driver.find_element(By.ID, "dictionary")).select_by_value("u001")
  _open(driver, None, "u001/0")
  driver.find_element(By.CSS_SELECTOR, "#tabs [data-list=dead]").click()
  listed = [li.get_attribute("data-latent") for li in driver.find_elements(By.CSS_SELECTOR, "#latents li")]
  assert "5" in listed and "6" not in listed
  driver.find_element(By.CSS_SELECTOR, "#tabs [data-list=dense]").click()
  listed = [li.get_attribute("data-latent") for li in driver.find_elements(By.CSS_SELECTOR, "#latents li")]
  assert "6" in listed and "5" not in listed
  driver.find_element(By.CSS_SELECTOR, "#latents li[data-latent='6']").click()
  _open(driver, None, "u001/6")
  _open(driver, (browser_dir["path"] / "index.html").as_uri() + "#u000/3", "u000/3")
  driver.find_element(By.CSS_SELECTOR, "#tabs [data-list=all]").click()
  driver.find_element(By.ID, "search").send_keys("script")
  listed = [li.get_attribute("data-latent") for li in driver.find_elements(By.CSS_SELECTOR, "#latents li")]
  assert "0" in listed and len(listed) < 40  # the planted latent, among few
  assert _errors(driver) == []
