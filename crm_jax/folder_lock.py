"""One run per output folder or workdir: ``FolderLock``, an exclusive lock on a folder.

The lock is ``fcntl.flock`` on ``<folder>/.crm-jax.lock``; the kernel releases it when the process
ends, however it ends, so a killed run never leaves it stuck. The file itself stays (removing it
would let a second run lock a new file while a third still holds the old one). Rules for users:
docs/faults_and_files.md.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from crm_jax.io import InputError

LOCK_FILE = ".crm-jax.lock"


class FolderLock:
  """``with FolderLock(folder, what):`` holds the folder's lock; a second holder is refused with
  one ``InputError`` line naming the folder and the process that holds it."""

  def __init__(self, folder: str, what: str = "output folder"):
    self.folder = folder
    self.what = what
    self.fd: Optional[int] = None

  def acquire(self) -> "FolderLock":
    path = os.path.join(self.folder, LOCK_FILE)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise InputError(f"{self.folder}: cannot lock this {self.what} "
                       f"({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
      os.close(fd)
      raise InputError(f"{self.folder}: another crm-jax run (process {holder}) is using this "
                       f"{self.what}; wait for it to end or choose another one") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
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
