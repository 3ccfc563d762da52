"""Multi-host training with real JAX processes on loopback (CPU devices), training transcoders
from a real activation store on a (data=2, model=2) mesh of 4 devices:

- 2 processes x 2 devices equal 1 process x 4 devices bitwise (same mesh, same global batches,
  same partitioned program; a 2-way all-reduce is commutative, so the order cannot differ);
- SIGKILL at random moments and inside a checkpoint write, restarted each time: the run ends
  bitwise equal to the uninterrupted one;
- SIGTERM to one process: both save the same step and exit with preemption.EXIT_CODE; that
  2-process checkpoint resumes on 1 and on 4 processes, which both end bitwise equal to the
  uninterrupted run (the data position is the step, over the seeded global order).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest

from allscope.trainers import preemption
from tests.pipelines.helpers import write_random_store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


class Job:
  """`n` processes of tests.trainers.multihost_script joined through ALLSCOPE_COORDINATOR."""

  def __init__(self, n: int, out: Path, store: Path, *args: str, logs: Path):
    port = portpicker.pick_unused_port()
    cache = logs.parent / "jax_cache"  # every run compiles the same programs: compile once
    devices = 4 // n
    self.logs = [logs / f"{out.name}.{time.monotonic_ns()}.{i}.log" for i in range(n)]
    self.procs = []
    for i, log in enumerate(self.logs):
      env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
             "JAX_COMPILATION_CACHE_DIR": str(cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
      if n > 1:
        env.update(ALLSCOPE_COORDINATOR=f"127.0.0.1:{port}", ALLSCOPE_NUM_PROCESSES=str(n),
                   ALLSCOPE_PROCESS_ID=str(i))
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.trainers.multihost_script", str(out), str(store),
             "--devices", str(devices), "--steps", str(STEPS), *args],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))

  def text(self, i: int = 0) -> str:
    return self.logs[i].read_text()

  def steps_done(self) -> int:
    """The latest step every process has printed (absolute: a resumed run starts past 1)."""
    return min(max((int(m) for m in re.findall(r"^step (\d+)$", t, re.M)), default=0)
               for t in map(self.text, range(len(self.procs))))

  def wait_for_step(self, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while self.steps_done() < step:
      stopped = any(p.poll() is not None for p in self.procs)
      if (stopped and self.steps_done() < step) or time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"the job stopped before step {step}:\n{self.text()[-3000:]}")
      time.sleep(0.05)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.procs:
      p.wait(60)

  def wait(self, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0, preemption.EXIT_CODE)
                                            for p in self.procs):
        time.sleep(2)  # a failed process's peers stop at their next collective; then kill
        self.kill()
        break
      time.sleep(0.1)
    return [p.returncode for p in self.procs]

  def result(self, i: int = 0) -> dict:
    return json.loads(self.text(i).strip().splitlines()[-1])


def _finish(n: int, out: Path, store: Path, logs: Path, params: Path, *args: str) -> dict:
  job = Job(n, out, store, "--params", str(params), *args, logs=logs)
  codes = job.wait()
  assert codes == [0] * n, f"exit codes {codes}\n{job.text()[-4000:]}"
  return job.result()


def _equal(a: Path, b: Path) -> None:
  with np.load(a) as x, np.load(b) as y:
    assert x.files == y.files
    for k in x.files:
      assert np.array_equal(x[k], y[k]), (k, np.abs(x[k] - y[k]).max())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The store, and the uninterrupted 2-process run's final parameters."""
  root = tmp_path_factory.mktemp("multihost")
  write_random_store(root / "store")
  logs = root / "logs"
  logs.mkdir()
  info = _finish(2, root / "straight", root / "store", logs, root / "straight.npz")
  assert info == {"resumed_from": None, "process_count": 2, "devices": 4}
  return root


def test_two_processes_equal_one_process_with_the_same_mesh(straight):
  info = _finish(1, straight / "one", straight / "store", straight / "logs", straight / "one.npz")
  assert info["process_count"] == 1 and info["devices"] == 4
  _equal(straight / "straight.npz", straight / "one.npz")


def test_sigkill_at_random_moments_then_restart_ends_bitwise_equal(straight):
  """Four kills of both processes, each followed by a restart: three at random moments (a
  checkpoint every step, so most land during an asynchronous write) and one inside a write."""
  rng = random.Random()
  out, store, logs = straight / "killed", straight / "store", straight / "logs"
  done = 0  # the latest committed checkpoint
  for trial in range(4):
    if trial == 2:  # the last process dies after writing its data file, before the commit
      job = Job(2, out, store, "--checkpoint-every", "1", "--kill-in-save", str(done + 2),
                logs=logs)
      assert -signal.SIGKILL in job.wait(), job.text()[-3000:]
    else:
      job = Job(2, out, store, "--checkpoint-every", "1", "--sleep", "0.1", logs=logs)
      job.wait_for_step(min(done + rng.randint(1, 2), STEPS - 1))
      time.sleep(rng.uniform(0.0, 0.2))
      job.kill()
    steps = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps, default=0) >= done
    done = max(steps, default=0)
  info = _finish(2, out, store, logs, straight / "killed.npz")
  assert info["resumed_from"] == done
  _equal(straight / "straight.npz", straight / "killed.npz")


def test_sigterm_checkpoints_every_process_at_one_step_and_resumes_on_1_and_on_4(straight):
  out, store, logs = straight / "term", straight / "store", straight / "logs"
  job = Job(2, out, store, "--sleep", "0.3", logs=logs)
  job.wait_for_step(4)
  job.procs[1].send_signal(signal.SIGTERM)
  codes = job.wait()
  assert codes == [preemption.EXIT_CODE] * 2, job.text()[-3000:]
  stopped = {job.result(i)["preempted"] for i in range(2)}
  assert len(stopped) == 1, stopped
  (step,) = stopped
  assert 4 <= step < STEPS
  assert f"resume by running the same command again (it continues from step {step})" in job.text()
  assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == step
  shutil.copytree(out, straight / "term4")
  for n, folder in ((1, out), (4, straight / "term4")):
    info = _finish(n, folder, store, logs, straight / f"term_{n}.npz")
    assert info["resumed_from"] == step and info["process_count"] == n
    _equal(straight / "straight.npz", straight / f"term_{n}.npz")
