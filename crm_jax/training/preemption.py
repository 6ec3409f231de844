"""SIGTERM and SIGINT (Ctrl-C) -> stop at the next step boundary, after a checkpoint. One process:
a handler sets a flag; several: every process stops at JAX's preemption sync point (SIGINT is
forwarded as a SIGTERM, which JAX's preemption service sees)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after saving ``state``; ``exit_status``: 128 + the signal."""

  def __init__(self, message: str, state, signal_name: str):
    super().__init__(message)
    self.state = state
    self.signal_name = signal_name

  @property
  def exit_status(self) -> int:
    return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


class Preemption:
  """Signal handlers (main thread only) until ``close``; ``reached(step)``: stop after ``step``."""

  def __init__(self, multi_process: bool):
    self.multi_process = multi_process
    self.name: Optional[str] = None  # the signal that asked to stop
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      # Several processes: SIGTERM is JAX's; SIGINT is forwarded to it.
      handlers = ({signal.SIGINT: self._forward} if multi_process
                  else {sig: self._handler for sig in SIGNALS})
      self._previous = {sig: signal.signal(sig, h) for sig, h in handlers.items()}

  def _handler(self, signum, frame):
    del frame
    if self.name is None:
      self.name = signal.Signals(signum).name

  def _forward(self, signum, frame):
    del signum, frame
    self.name = 'SIGINT'
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self.multi_process:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.name = self.name or 'SIGTERM'
          return True
      except RuntimeError:  # no preemption service in this JAX setup.
        pass
      return False
    return self.name is not None

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
