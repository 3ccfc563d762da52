"""Preemption: SIGTERM (how schedulers preempt) or SIGINT stops every process at one step.

Single process: a handler sets a flag, read at the next step boundary. Several processes: JAX's
preemption service (started by jax.distributed.initialize) catches SIGTERM on any process and
agrees with all of them on the next safe step through the coordination service, without a
collective per step; SIGINT is forwarded to it as SIGTERM. The loop then saves a checkpoint at
that step on every process and raises Preempted; the CLI exits with EXIT_CODE.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: "try again" -- rerun the same command to resume


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after a checkpoint at `step` on every process."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = step, directory
    super().__init__(
        f"preempted: every process saved a checkpoint at step {step} in {directory} and stopped; "
        f"resume by running the same command again (it continues from step {step}), "
        f"exit code {EXIT_CODE}")


class Guard:
  """Context manager; `reached(step)` must be called at every step boundary on every process."""

  def __init__(self):
    self._flag = False
    self._previous: dict[int, object] = {}
    self._multi = False

  def __enter__(self) -> "Guard":
    self._multi = jax.distributed.is_initialized() and jax.process_count() > 1
    if threading.current_thread() is not threading.main_thread():
      return self  # signals reach the main thread only; a caller elsewhere handles its own
    if self._multi:
      # SIGTERM belongs to JAX's preemption notifier; a Python handler would replace it.
      self._install(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._install(sig, self._set)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _install(self, sig: int, handler) -> None:
    self._previous[sig] = signal.signal(sig, handler)

  def _set(self, *_) -> None:
    self._flag = True

  def reached(self, step: int) -> bool:
    """True on every process at the same step once any process was told to stop."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag
