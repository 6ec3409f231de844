"""Outputs: checked before the work, written atomically (a killed write leaves no file under the
final name), leftovers of killed runs removed; errors as one line naming the file."""

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
import threading
from typing import Callable, Iterable, Iterator, List

import cv2
import numpy as np

from crm_jax.io import InputError

TMP_MARK = ".tmp-"  # temporary names: <stem>.tmp-<pid>-<random>


class WriteError(OSError):
  """An output that could not be written: one line naming the target (``filename``) and cause."""

  def __str__(self) -> str:
    return f"{self.filename}: cannot be written ({self.strerror})"


def os_error_line(e: OSError) -> str:
  """An ``OSError`` as one line naming the path and the problem."""
  if e.filename is not None and e.strerror and not isinstance(e, WriteError):
    return f"{e.filename}: {e.strerror}"
  return str(e)


def one_line(e: BaseException) -> str:
  """An error's message on one line."""
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def error_line(e: BaseException) -> str:
  """An error as one line: an OS error names its path; any but a bad input's names its type."""
  if isinstance(e, OSError):
    return os_error_line(e)
  return one_line(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {one_line(e)}"


def _writable_dir(path: str) -> None:
  """Creates ``path`` if needed and proves a file can be made in it (``InputError`` if not)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()  # a file can be made there
  except OSError as e:
    raise InputError(f"{path}: cannot write in this folder ({e.strerror or e})") from None


def check_output_dir(path: str, inputs: Iterable[str] = (), create: bool = True) -> str:
  """Before any work: ``path`` as an output folder, created; ``InputError`` when it is a file,
  cannot be written, or is (or lies inside) one of the ``inputs`` folders. ``create=False``:
  only the checks that need no folder (before the inputs are listed)."""
  real = os.path.realpath(path)
  for folder in inputs:
    inside = os.path.realpath(folder or ".").rstrip(os.sep)
    if folder and os.path.isdir(folder) and (real == inside or real.startswith(inside + os.sep)):
      raise InputError(f"{path}: the output folder is (or lies inside) the input folder "
                       f"{folder}; its files would be mixed with or overwrite the inputs: "
                       "choose another output folder")
  if create:
    _writable_dir(path)
  elif os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{path}: is a file, not a folder")
  return path


def check_output_file(path: str, inputs: Iterable[str] = ()) -> str:
  """Before any work: ``path`` as an output image file (its folder created); ``InputError`` when
  it is a folder, no image name OpenCV writes, one of the ``inputs``, or in an unwritable folder."""
  if path.endswith(("/", os.sep)) or os.path.isdir(path):
    raise InputError(f"{path}: is a folder; give an image file name such as refined.png")
  if not cv2.haveImageWriter(path):
    raise InputError(f"{path}: not an image file name (use a .png extension, or .jpg, .bmp, "
                     ".tif)")
  for f in inputs:
    if f and os.path.exists(path) and os.path.exists(f) and os.path.samefile(path, f):
      raise InputError(f"{path}: is the input {f}; writing would overwrite it: choose another "
                       "output file")
  try:
    _writable_dir(os.path.dirname(os.path.abspath(path)))
  except InputError as e:
    raise InputError(f"{path}: cannot be written there ({e})") from None
  return path


def tmp_prefix(stem: str = "") -> str:
  """The start of a temporary name made by this process: ``<stem>.tmp-<pid>-``."""
  return f"{stem}{TMP_MARK}{os.getpid()}-"


def _alive(pid: str) -> bool:
  """Whether process ``pid`` (from a temporary name) runs; False for no pid."""
  try:
    os.kill(int(pid), 0)
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    pass
  return True


def remove_leftovers(directory: str, stem: str = "") -> List[str]:
  """Removes the ``<stem>.tmp-<pid>-*`` files and folders in ``directory`` whose process is gone
  (killed writes); returns their names."""
  try:
    names = sorted(os.listdir(directory))
  except OSError:
    return []
  removed = []
  for f in names:
    if f.startswith(stem + TMP_MARK) and not _alive(f[len(stem + TMP_MARK):].split("-", 1)[0]):
      path = os.path.join(directory, f)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
      removed.append(f)
  return removed


# The temporary files being filled now and whether writes were stopped (under ``_WRITES_LOCK``).
_WRITES_LOCK, _FILLING, _STOPPED = threading.Lock(), set(), threading.Event()


def stop_writes() -> List[str]:
  """Ends this process's writes for good (a run stopped by a signal): removes the temporary files
  being filled and makes every later write a ``WriteError`` (``ECANCELED``); returns them."""
  with _WRITES_LOCK:
    _STOPPED.set()
    removed = sorted(_FILLING)
    for tmp in removed:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    _FILLING.clear()
  return removed


def _write_error(path: str, e: OSError) -> WriteError:
  return WriteError(e.errno or errno.EIO, e.strerror or str(e) or type(e).__name__, path)


def _replace(path: str, fill: Callable[[int, str], None]) -> None:
  """``fill(fd, tmp)`` fills a new temporary file beside ``path`` (mode 0o666 less the umask),
  which is fsynced, closed and renamed over ``path``, the folder then fsynced. A failure leaves
  ``path`` as it was and no temporary file, and raises ``WriteError`` naming ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  with _WRITES_LOCK:
    try:
      if _STOPPED.is_set():
        raise OSError(errno.ECANCELED, "the run was interrupted: no more writes")
      os.makedirs(directory, exist_ok=True)
      tmp = os.path.join(directory, tmp_prefix() + secrets.token_hex(8) + os.path.splitext(path)[1])
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
      raise _write_error(path, e) from None
    _FILLING.add(tmp)
  try:
    try:
      fill(fd, tmp)
      os.fsync(fd)  # a full disk or a failing device shows here at the latest
    finally:
      os.close(fd)  # network file systems report write errors at close
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise _write_error(path, e) from None
    raise
  finally:
    with _WRITES_LOCK:
      _FILLING.discard(tmp)
  with contextlib.suppress(OSError):  # makes the rename durable where the OS allows it
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def write_bytes(path: str, data: bytes) -> None:
  """Creates or replaces ``path`` with ``data``, atomically and durably (``_replace``)."""
  def fill(fd: int, tmp: str) -> None:
    view = memoryview(data)
    while view:  # every byte checked (a full disk raises ENOSPC)
      n = os.write(fd, view)
      if n <= 0:
        raise OSError(errno.EIO, "the system wrote nothing")
      view = view[n:]
  _replace(path, fill)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Creates ``path`` atomically from a writer that wants a file name: ``write(tmp)`` fills a
  temporary ``.tmp-<pid>-*`` file beside it, then fsynced and renamed (``_replace``)."""
  def fill(fd: int, tmp: str) -> None:
    write(tmp)
    written = os.open(tmp, os.O_RDONLY)  # the writer may have made a new file under the name
    try:
      os.fsync(written)
    finally:
      os.close(written)
  _replace(path, fill)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically and durably (``write_bytes``)."""
  write_bytes(path, text.encode("utf-8"))


def encode_image(img: np.ndarray, ext: str = ".png") -> bytes:
  """RGB ``[H, W, 3]`` (or grey) -> the bytes of ``ext`` (``.png``, ``.jpg``...) by OpenCV;
  ``ValueError`` when OpenCV cannot encode it."""
  img = np.asarray(img)
  what = f"OpenCV cannot encode a {img.dtype} {tuple(img.shape)} image as {ext}"
  try:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(
        img[:, :, ::-1] if img.ndim == 3 and img.shape[2] == 3 else img))
  except cv2.error as e:
    raise ValueError(f"{what} ({str(e).strip().splitlines()[-1]})") from None
  if not ok:
    raise ValueError(what)
  return buf.tobytes()


def write_image(path: str, img: np.ndarray) -> None:
  """Writes RGB (or grey) ``img`` as ``path``'s extension says, atomically (``write_bytes``);
  ``WriteError`` names ``path`` and the cause (an image OpenCV cannot encode too)."""
  try:
    data = encode_image(img, os.path.splitext(path)[1] or ".png")
  except ValueError as e:
    raise WriteError(errno.EINVAL, str(e), path) from None
  write_bytes(path, data)


def is_complete_output(path: str) -> bool:
  """Whether ``path`` is a whole output: a non-empty regular file (written under a temporary name
  and renamed, so a killed write leaves no file under the final name)."""
  try:
    st = os.stat(path)
  except OSError:
    return False
  return stat.S_ISREG(st.st_mode) and st.st_size > 0


@contextlib.contextmanager
def folder_written_atomically(path: str) -> Iterator[str]:
  """``with folder_written_atomically(PATH) as tmp:`` fill ``tmp``, a new folder beside PATH
  (leftovers of killed writes removed first); at the end it replaces PATH, so PATH is whole or as
  it was. On an error the temporary folder is removed and the error raised."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  remove_leftovers(parent, os.path.basename(path))
  tmp = tempfile.mkdtemp(prefix=tmp_prefix(os.path.basename(path)), dir=parent)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
