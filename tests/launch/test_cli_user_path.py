"""What the `allscope` command says and records: refused inputs stop before any work and leave
the run's record alone; a stage ends with where its outputs are and the next command; expected
errors are one or two lines with the fix and a documented exit code (`--debug` adds the
traceback)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from allscope.launch import cli
from allscope.pipelines import store
from allscope.trainers import preemption
from tests.pipelines.helpers import write_random_store
from tests.release.browser.helpers import random_release

TINY = ["train.kind=transcoder", "train.activation=topk", "train.k=4", "train.layers=[1,4]",
        "train.width=32", "train.batch_size=16", "train.steps=4", "train.lr_warmup_steps=1",
        "train.checkpoint_every=2", "train.log_every=2", "train.mesh_data=1"]


@pytest.fixture()
def run(tmp_path):
  """A run folder holding a real (random) activation store."""
  write_random_store(tmp_path / "store")
  return tmp_path


def _main(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


def _history(run: Path) -> list[str]:
  return sorted(p.name for p in (run / "configs").glob("*.json"))


def test_negative_lr_is_refused_before_any_work(tmp_path, capsys):
  code, _, err = _main(capsys, "train", f"output_dir={tmp_path / 'new'}", "train.lr=-1")
  assert code == cli.EXIT_INPUT
  assert "train.lr=-1.0 is out of range; it must lie in (0, inf)" in err
  assert "Traceback" not in err and not (tmp_path / "new").exists()


def test_sample_refuses_a_negative_token_count_before_the_model_loads(capsys):
  code, _, err = _main(capsys, "sample", "--tokens", "-3")
  assert code == cli.EXIT_INPUT and "--tokens -3: give a number of tokens >= 1" in err
  assert "loading" not in err and "Traceback" not in err


def test_a_batch_larger_than_the_store_is_refused_naming_both(run, capsys):
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY, "train.batch_size=400")
  assert code == cli.EXIT_INPUT
  assert "train.batch_size=400 exceeds the 104 rows the store" in err  # 9 + 10 + 7 records of 4
  assert _history(run) == [] and not (run / "config.json").exists()


def test_config_history_keeps_the_first_record_and_adds_one_per_working_command(run, capsys):
  code, out, err = _main(capsys, "train", f"output_dir={run}", *TINY)
  assert code == 0, err
  assert f"curves: tensorboard --logdir {run}" in out  # where the outputs are, and what next
  assert f"next: allscope evaluate output_dir={run} train.kind=transcoder" in out
  first = (run / "config.json").read_text()
  assert json.loads(first)["train"]["steps"] == 4
  train_record = (run / "train" / "train_config.json").read_text()
  assert [n.split("-")[0] for n in _history(run)] == ["train"]
  # Refused (a different width than the checkpoint's): nothing recorded, config.json unchanged.
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY, "train.width=64")
  assert code == cli.EXIT_INPUT and "train.width=32" in err
  assert (run / "config.json").read_text() == first and len(_history(run)) == 1
  # Refused (fewer steps than the finished run's): the same.
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY, "train.steps=2")
  assert code == cli.EXIT_INPUT and "holds step 4, past train.steps=2" in err
  assert (run / "config.json").read_text() == first and len(_history(run)) == 1
  assert (run / "train" / "train_config.json").read_text() == train_record
  assert "passes over the store" not in err
  # More steps: real work, so a second history entry; config.json still the first record. The
  # 8 x 16 rows exceed the store's 104: said aloud.
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY, "train.steps=8")
  assert code == 0, err
  assert "1.2 passes over the store's 104 rows: rows repeat" in err
  assert (run / "config.json").read_text() == first
  entries = _history(run)
  assert len(entries) == 2
  assert json.loads((run / "configs" / entries[-1]).read_text())["train"]["steps"] == 8


def test_launch_records_nothing(tmp_path, capsys):
  code, out, err = _main(capsys, "launch", "--stage", "train", f"output_dir={tmp_path}")
  assert code == 0, err
  assert not (tmp_path / "config.json").exists() and _history(tmp_path) == []


def test_a_corrupt_shard_is_one_line_with_the_fix_and_exit_3(run, capsys):
  shard = next((run / "store").glob("mlp_in/layer_*/*"))
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size, different bytes
  shard.write_bytes(bytes(data))
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY)
  assert code == cli.EXIT_STORE, err
  assert "does not match" in err and store.REPAIR in err
  assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
  code, _, err = _main(capsys, "train", f"output_dir={run}", *TINY, "--debug")
  assert code == cli.EXIT_STORE and "Traceback" in err


def test_an_incomplete_store_says_how_to_resume(tmp_path, capsys):
  (tmp_path / "store").mkdir()
  code, _, err = _main(capsys, "train", f"output_dir={tmp_path}", *TINY)
  assert code == cli.EXIT_STORE and "not a complete activation store" in err
  assert "resumes" in err and "Traceback" not in err


# As a Beam worker process reports a failure (FnApiRunner with direct_num_workers > 1).
BEAM_TEXT = """Traceback (most recent call last):
  File "apache_beam/runners/common.py", line 1512, in process
allscope.pipelines.corpus.CorpusError: corpus file /d/x.txt is not UTF-8 text (byte 3: invalid)

During handling of the above exception, another exception occurred:
RuntimeError: bundle failed [while running 'Harvest/TokenizePack']"""


@pytest.mark.parametrize("error,code,message,fix", [
    (store.CorruptShardError("s: the shard is corrupt"), cli.EXIT_STORE, "s: the shard is corrupt",
     "re-run `allscope harvest`"),
    (store.IncompleteStoreError("x is not a complete store"), cli.EXIT_STORE, "x is not",
     "resumes"),
    (FileExistsError("r holds a release"), cli.EXIT_RELEASE, "r holds a release", ""),
    (OSError(errno.ENOSPC, "No space left on device", "/o/train/x"), cli.EXIT_DISK_FULL,
     "no space left on the device writing /o/train/x", "free space"),
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "interrupted", "run the same command again"),
    (preemption.Preempted(3, "/o/ckpt"), preemption.EXIT_CODE, "checkpoint at step 3", ""),
    (RuntimeError(BEAM_TEXT), cli.EXIT_INPUT, "corpus file /d/x.txt is not UTF-8 text", ""),
    (RuntimeError("Traceback ...\nOSError: [Errno 28] No space left on device: '/o/s/x'"),
     cli.EXIT_DISK_FULL, "no space left on the device", "free space"),
    (ValueError("train.lr bad"), cli.EXIT_INPUT, "train.lr bad", ""),
])
def test_expected_errors_have_distinct_codes_messages_and_fixes(error, code, message, fix):
  got = cli.classify(error)
  assert got is not None and got[0] == code and message in got[1] and fix in got[2]
  assert "Traceback" not in got[1]


def test_a_safetensors_error_is_a_release_error():
  from safetensors import SafetensorError
  assert cli.classify(SafetensorError("invalid header"))[0] == cli.EXIT_RELEASE


def test_unexpected_errors_keep_their_traceback():
  assert cli.classify(RuntimeError("XLA internal")) is None
  assert cli.classify(TypeError("bug")) is None


def test_exit_codes_are_distinct_and_documented_in_the_readme():
  codes = {n: v for n, v in vars(cli).items() if n.startswith("EXIT_")}
  codes["preempted"] = preemption.EXIT_CODE
  assert len(set(codes.values())) == len(codes)
  readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
  for value in codes.values():
    assert f"| {value} |" in readme


def _digests(root: Path) -> dict[str, tuple[bytes, int]]:
  return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_release_dry_run_on_a_finished_run_evaluates_and_rewrites_nothing(tmp_path, capsys):
  root, _ = random_release(tmp_path)
  before = _digests(root)
  dest = tmp_path / "published"
  # Overrides after the flags are accepted; overwrite=true does not make a dry run write.
  code, out, err = _main(capsys, "release", "--to", dest, "--dry-run", "browse.enabled=false",
                         f"output_dir={tmp_path}", "release.overwrite=true")
  assert code == 0, err
  assert f"[dry run] would rewrite (release.overwrite=true) the release in {root}" in err
  assert f"[dry run] would upload {dest}/manifest.json" in out
  assert "Traceback" not in err and not dest.exists()
  assert _digests(root) == before and _history(tmp_path) == []


def test_release_to_a_target_publishes_the_existing_release_as_it_is(tmp_path, capsys):
  root, _ = random_release(tmp_path)
  before = _digests(root)
  dest = tmp_path / "published"
  code, out, err = _main(capsys, "release", f"output_dir={tmp_path}", "--to", dest,
                         "browse.enabled=false")
  assert code == 0, err
  assert f"keeping the existing release in {root}" in err
  assert f"release: {root}  (model card: {root}/README.md)" in out and "next:" not in out
  assert _digests(root) == before
  assert (dest / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


def test_unknown_flags_are_still_refused(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["release", "--dryrun"])
  assert e.value.code == 2 and "unrecognized arguments: --dryrun" in capsys.readouterr().err


def test_release_dry_run_without_a_release_or_checkpoint_says_train_first(tmp_path, capsys):
  code, _, err = _main(capsys, "release", "--dry-run", f"output_dir={tmp_path}")
  assert code == cli.EXIT_INPUT and "nothing to release" in err and "allscope train" in err
  assert list(tmp_path.iterdir()) == []


def test_training_divergence_from_a_beam_style_text_keeps_its_code():
  text = "Traceback ...\nallscope.trainers.loop.TrainingDiverged: training stopped at step 3\n"
  assert cli.classify(RuntimeError(text))[:2] == (cli.EXIT_DIVERGED, "training stopped at step 3")


def test_evaluate_checks_the_held_out_text_before_loading_the_model(tmp_path, monkeypatch):
  """Too many evaluate.n_sequences for the held-out tokens, or a run whose store was never
  harvested, is refused before the weights load, and records nothing."""
  from allscope import models
  from allscope.launch import config as config_lib, stages

  def no_load(*a, **k):
    raise AssertionError("the model loaded before the held-out text was checked")

  monkeypatch.setattr(models, "load", no_load)
  tokens = tmp_path / "heldout.npy"
  np.save(tokens, np.random.default_rng(0).integers(3, 1000, (3, 32), dtype=np.int32))
  cfg = config_lib.load(None, [f"output_dir={tmp_path}", f"evaluate.tokens={tokens}",
                               "evaluate.seq_len=32", "evaluate.n_sequences=50"])
  with pytest.raises(ValueError, match="evaluate.n_sequences=50 but the held-out tokens hold "
                     "only 3 sequences"):
    stages._evaluate(cfg, [])
  cfg = config_lib.load(None, [f"output_dir={tmp_path}"])
  with pytest.raises(store.IncompleteStoreError, match="no harvest has been written here"):
    stages._evaluate(cfg, [])
  assert _history(tmp_path) == []


def test_a_message_that_names_its_fix_is_not_given_a_second_one():
  error = store.CorruptShardError(f"s: sha256 does not match its receipt; {store.REPAIR}")
  code, message, fix = cli.classify(error)
  assert code == cli.EXIT_STORE and store.REPAIR in message and fix == ""
