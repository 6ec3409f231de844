"""One run per output folder or workdir: ``FolderLock``, ``fcntl.flock`` on the folder itself (no
file added; the kernel releases it however the process ends). Rules: docs/faults_and_files.md."""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from crm_jax.io import InputError


class FolderLock:
  """``with FolderLock(folder, what):`` holds the folder's lock; a second holder (even in this
  process) is refused with one ``InputError`` line naming the folder."""

  def __init__(self, folder: str, what: str = "output folder"):
    self.folder = folder
    self.what = what
    self.fd: Optional[int] = None

  def acquire(self) -> "FolderLock":
    try:
      fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      raise InputError(f"{self.folder}: cannot lock this {self.what} "
                       f"({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise InputError(f"{self.folder}: another crm-jax run is using this {self.what}; wait "
                       "for it to end or choose another one") from None
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> "FolderLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
